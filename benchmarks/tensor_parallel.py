"""Tensor parallel 1 vs 2 on one checkpoint: weight bytes per rank, step times, collectives' share.

    python benchmarks/tensor_parallel.py [--model DIR] [--requests 16] [--output-tokens 64]

Without --model it builds a random-weight Qwen2.5-VL (hidden 1024, 8 layers) once into
.cache/bench-tp. On CPU the ranks share the machine's cores (cores / ranks threads each), so TP 2
cannot be faster here than TP 1: the table shows what splitting costs (collectives, the step
message) and what it saves (weights and KV per rank). Collective time is measured on rank 0 and
includes waiting for the slower rank.
"""
import argparse
import time
from pathlib import Path

import torch
import torch.distributed as dist

from qwenvl_pd import LLM, SamplingParams
from qwenvl_pd.model_config import ModelConfig
from qwenvl_pd.model.parallel import TensorParallel
from qwenvl_pd.model.registry import MODELS
from qwenvl_pd.model.tiny import make_tiny

MODEL = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=4, mrope_section=[8, 12, 12])
COLLECTIVES = ("all_reduce", "gather", "broadcast")


def weight_bytes(path: Path, tp: TensorParallel) -> tuple[int, int]:
    """(text weights, vision weights) in bytes that rank tp.rank holds in float32: the model
    built on the meta device has exactly each parameter's shard shape."""
    config = ModelConfig.from_hf(path)
    with torch.device("meta"):
        model = MODELS[config.family][0](config, tp)
    sizes = {n: p.numel() * 4 for n, p in model.named_parameters()}
    vision = sum(v for n, v in sizes.items() if "visual" in n)
    return sum(sizes.values()) - vision, vision


class Timers:
    """Wraps the engine's step and torch.distributed's collectives on rank 0."""

    def __init__(self, engine):
        self.engine, self.inner = engine, engine.step
        self.prefill, self.decode, self.decode_steps = 0.0, 0.0, 0
        self.collective = dict.fromkeys(COLLECTIVES, 0.0)
        self.saved = {name: getattr(dist, name) for name in COLLECTIVES}

    def __enter__(self):
        for name, fn in self.saved.items():
            setattr(dist, name, self._timed(name, fn))
        self.engine.step = self._step
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(dist, name, fn)
        self.engine.step = self.inner

    def _timed(self, name: str, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            self.collective[name] += time.perf_counter() - t
            return out
        return wrapper

    def _step(self):
        s = self.engine.scheduler
        prefilling = bool(s.waiting) or any(q.num_computed < q.prompt_len for q in s.running)
        t = time.perf_counter()
        out = self.inner()
        dt = time.perf_counter() - t
        if prefilling:
            self.prefill += dt
        else:
            self.decode, self.decode_steps = self.decode + dt, self.decode_steps + 1
        return out


def run(path: Path, tp: int, n: int, out_tokens: int) -> dict:
    llm = LLM(str(path), max_model_len=4096, tensor_parallel_size=tp)
    prompt = "<|im_start|>user\n" + "tell me a story " * 60 + "<|im_end|>\n<|im_start|>assistant\n"
    params = SamplingParams(max_tokens=out_tokens, temperature=0, ignore_eos=True)
    llm.generate([prompt], SamplingParams(max_tokens=4, ignore_eos=True))  # warm up
    with Timers(llm.engine) as timers:
        t = time.perf_counter()
        llm.generate([prompt + str(i) for i in range(n)], params)
        wall = time.perf_counter() - t
    llm.close()
    total = timers.prefill + timers.decode
    return {"wall": wall, "tok/s": n * out_tokens / wall, "prefill_s": timers.prefill,
            "decode_ms": 1e3 * timers.decode / max(timers.decode_steps, 1),
            "shares": {k: v / total for k, v in timers.collective.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--output-tokens", type=int, default=64)
    args = ap.parse_args()
    path = Path(args.model) if args.model else Path(".cache/bench-tp")
    if not args.model and not (path / "config.json").exists():
        make_tiny("qwen2_5_vl", path, text_overrides=MODEL)
    print(f"{path}: {args.requests} requests x {args.output_tokens} tokens, greedy; "
          f"{torch.get_num_threads()} CPU threads in all")
    print(f"{'TP':>3} {'text MB/rank':>13} {'vision MB r0':>13} {'tok/s':>8} {'prefill s':>10} "
          f"{'decode step ms':>15} {'in collectives (all_reduce / gather / step broadcast)':>54}")
    for tp in (1, 2):
        text, vision = weight_bytes(path, TensorParallel(tp - 1, tp))  # the last rank: no vision
        vision = weight_bytes(path, TensorParallel(0, tp))[1]
        r = run(path, tp, args.requests, args.output_tokens)
        print(f"{tp:>3} {text / 2**20:>13.1f} {vision / 2**20:>13.1f} {r['tok/s']:>8.1f} "
              f"{r['prefill_s']:>10.2f} {r['decode_ms']:>15.1f} {_shares(r['shares']):>54}")


def _shares(shares: dict) -> str:
    parts = " / ".join(f"{100 * v:.1f}" for v in shares.values())
    return f"{100 * sum(shares.values()):.1f}% ({parts})"


if __name__ == "__main__":
    main()

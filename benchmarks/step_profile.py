"""Where a decode step's time goes: 16 sequences at a long and a short context.

    python benchmarks/step_profile.py [--model DIR] [--dtype bfloat16] [--contexts 256 4096]
                                      [--seqs 16] [--steps 4] [--repeat 5]
                                      [--attention reference kernel] [--threads N]

Without --model it builds a random-weight Qwen2.5-VL of about 0.7B parameters (hidden 1024,
24 layers, 8 heads, 2 KV heads) once into ~/.cache/qwenvl-pd/bench-0.7b. The sequences join as a
decode node's do (their prompts' K/V "already in the cache", here whatever the cache holds), so
a 4k context costs no prefill; the engine then runs its real decode steps. Printed per context:
the step's wall time split into scheduling, input preparation, forward, logits and sampling,
the forward split by operator (torch profiler: attention gather vs compute, linears, the rest),
and decode tokens/s. Step times and tok/s are medians over --repeat runs of --steps steps,
phase times means over the same steps (so on a busy machine their sum can pass the median). With both attention paths
named (the torch reference, which gathers each row's context, and the CPU kernel reading the
cache in place: model/layers/cpu_paged.py), their runs alternate in one process, so a shared
machine's load falls on both alike.
"""
import argparse
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from qwenvl_pd import LLM, SamplingParams
from qwenvl_pd.engine.sequence import FinishReason, Sequence
from qwenvl_pd.model.layers import bf16_linear, cpu_paged
from qwenvl_pd.model.tiny import make_tiny

MODEL_0_7B = dict(hidden_size=1024, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=8, num_key_value_heads=2, mrope_section=[16, 24, 24])
# profiler op name fragments -> what they are in a step
CATEGORIES = [
    ("attention gather", ("index_select",)),
    ("attention compute", ("scaled_dot_product", "flash_attention", "flex_attention", "paged")),
    ("kv write", ("index_copy",)),
    ("linear", ("aten::mm", "aten::addmm", "aten::linear", "aten::matmul", "aten::bmm",
                "mkldnn::_linear_pointwise", "bf16_linear")),
]


def checkpoint(path: Path) -> Path:
    if not (path / "config.json").exists():
        make_tiny("qwen2_5_vl", path, text_overrides=MODEL_0_7B)
    return path


def join(llm: LLM, n: int, ctx: int) -> list[Sequence]:
    """n sequences with ctx-token prompts whose K/V sit in the cache, as a decode node takes them."""
    engine, seqs = llm.engine, []
    for i in range(n):
        tokens = [1000 + (i * 7 + j) % 90000 for j in range(ctx)]
        seq = Sequence(f"p{ctx}-{i}", tokens, torch.arange(ctx).expand(3, -1), 0,
                       SamplingParams(max_tokens=10_000, temperature=0, ignore_eos=True))
        seq.block_ids = engine.blocks.allocate_n(engine.blocks.blocks_needed(ctx))
        seq.token_ids.append(1)
        engine.scheduler.add_prefilled(seq)
        seqs.append(seq)
    return seqs


class Timers:
    """Wraps the engine's step phases with wall-clock accumulators."""

    def __init__(self, llm: LLM):
        self.total = defaultdict(float)
        self.attach(llm)

    def attach(self, llm: LLM) -> None:
        engine, runner, model = llm.engine, llm.engine.runner, llm.model
        engine.scheduler.schedule = self.wrap("schedule", engine.scheduler.schedule)
        runner.prepare = self.wrap("prepare inputs", runner.prepare)
        runner.inputs = self.wrap("prepare inputs", runner.inputs)
        model.forward = self.wrap("forward", model.forward)
        model.compute_logits = self.wrap("logits", model.compute_logits)
        engine._postprocess = self.wrap("sample + postprocess", engine._postprocess)

    def wrap(self, name, fn):
        def timed(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            self.total[name] += time.perf_counter() - t
            return out
        return timed


def run_steps(llm: LLM, steps: int) -> float:
    t = time.perf_counter()
    for _ in range(steps):
        llm.engine.step()
    return time.perf_counter() - t


def labelled(fn, name: str):
    """fn named for the profiler: a ctypes call is no torch op."""
    def call(*a, **k):
        with record_function(name):
            return fn(*a, **k)
    return call


def op_shares(llm: LLM) -> dict[str, float]:
    """Self CPU ms per category over one step."""
    kernels = cpu_paged.paged_decode, bf16_linear.linear
    cpu_paged.paged_decode = labelled(kernels[0], "cpu_paged_decode")
    bf16_linear.linear = labelled(kernels[1], "bf16_linear")
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            llm.engine.step()
    finally:
        cpu_paged.paged_decode, bf16_linear.linear = kernels
    shares, other = defaultdict(float), {}
    for ev in prof.key_averages():
        name = next((c for c, keys in CATEGORIES if any(k in ev.key for k in keys)), "other ops")
        shares[name] += ev.self_cpu_time_total / 1000
        if name == "other ops":
            other[ev.key] = ev.self_cpu_time_total / 1000
    top = sorted(other.items(), key=lambda kv: -kv[1])[:6]
    return shares, ", ".join(f"{k} {v:.0f}" for k, v in top)


def use(mode: str) -> None:
    os.environ["QWENVL_PD_CPU_KERNEL"] = "1" if mode == "kernel" else "0"


def profile_context(llm: LLM, n: int, ctx: int, steps: int, repeat: int, modes: list[str]) -> dict:
    seqs = join(llm, n, ctx)
    results = {}
    for mode in modes:
        use(mode)
        run_steps(llm, 2)  # warm-up: buffers, first-call costs
        results[mode] = {"walls": [], "timers": Timers(llm)}
        _unwrap(llm)
    for _ in range(repeat):
        for mode in modes:
            use(mode)
            r = results[mode]
            r["timers"].attach(llm)
            r["walls"].append(run_steps(llm, steps))
            _unwrap(llm)
    for mode in modes:
        use(mode)
        r = results[mode]
        r["ops"], r["other"] = op_shares(llm)
        r["wall"] = statistics.median(r["walls"]) / steps
        r["phases"] = {k: v / (steps * repeat) for k, v in r["timers"].total.items()}
        r["tok/s"] = n / r["wall"]
    for s in seqs:
        llm.engine.finish(s, FinishReason.ABORT)
    return results


def _unwrap(llm: LLM) -> None:
    for obj, names in ((llm.engine.scheduler, ["schedule"]), (llm.engine.runner, ["prepare", "inputs"]),
                       (llm.model, ["forward", "compute_logits"]), (llm.engine, ["_postprocess"])):
        for name in names:
            obj.__dict__.pop(name, None)


def report(ctx: int, n: int, mode: str, r: dict) -> None:
    print(f"\n== {mode} attention, {n} sequences at {ctx} context: step {r['wall'] * 1000:.1f} ms, "
          f"{r['tok/s']:.1f} decode tok/s")
    print(f"{'phase':<24}{'ms/step':>10}{'share':>8}")
    for k, v in sorted(r["phases"].items(), key=lambda kv: -kv[1]):
        print(f"{k:<24}{v * 1000:>10.1f}{v / r['wall']:>8.0%}")
    total = sum(r["ops"].values())
    print(f"{'operator (1 profiled step)':<28}{'self ms':>8}{'share':>8}")
    for k, v in sorted(r["ops"].items(), key=lambda kv: -kv[1]):
        print(f"{k:<28}{v:>8.1f}{v / total:>8.0%}")
    print(f"  other ops, most (ms): {r['other']}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=Path.home() / ".cache/qwenvl-pd/bench-0.7b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--contexts", type=int, nargs="+", default=[256, 4096])
    ap.add_argument("--seqs", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--attention", nargs="+", default=["reference", "kernel"],
                    choices=["reference", "kernel"])
    args = ap.parse_args()
    if args.threads:  # one thread: steadier numbers on a machine shared with other work
        torch.set_num_threads(args.threads)
    width = max(args.contexts) + (args.steps + 2) * (args.repeat + 2) * len(args.attention) + 16
    blocks = args.seqs * (-(-width // 16) + 1)
    llm = LLM(str(checkpoint(args.model)), dtype=args.dtype, max_model_len=width + 16,
              num_kv_blocks=blocks, enable_prefix_caching=False, max_num_seqs=args.seqs)
    print(f"{args.model.name}, {args.dtype}, {torch.get_num_threads()} threads")
    summary = {}
    for ctx in args.contexts:
        summary[ctx] = profile_context(llm, args.seqs, ctx, args.steps, args.repeat, args.attention)
        for mode, r in summary[ctx].items():
            report(ctx, args.seqs, mode, r)
    print(f"\nsummary: decode tok/s, {args.seqs} sequences (median step)")
    print(f"{'context':>8}" + "".join(f"{m:>12}" for m in args.attention))
    for ctx, results in summary.items():
        print(f"{ctx:>8}" + "".join(f"{results[m]['tok/s']:>12.1f}" for m in args.attention))


if __name__ == "__main__":
    main()

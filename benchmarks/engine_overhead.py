"""The engine's own work per step, apart from the model, against the batch and the KV pool size.

    python benchmarks/engine_overhead.py [--batches 1 32 256] [--pools 4096 32768 131072]
                                         [--steps 48] [--skip-tiny]

Part 1 times decode steps of LLMEngine.step() with a stand-in model (its forward returns zeros,
its logits are fixed random rows over a small vocabulary, so sampling is a greedy argmax over a
few thousand columns): what is left is scheduling, input preparation, sampling, postprocessing
and block bookkeeping. Each batch decodes prompts of 64-192 random tokens, all of which fit the
smallest pool, so only the pool size changes along a row.

Part 2 is the whole engine on a tiny checkpoint (hidden 128, 3 layers, the real vocabulary,
built once into .cache/bench-tiny): output tok/s of 32 mixed requests (engine_vs_transformers'
workload) with a small and a large pool, side by side.
"""
import argparse
import dataclasses
import gc
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from engine_vs_transformers import workload  # noqa: E402

import qwenvl_pd.engine.llm_engine as llm_engine  # noqa: E402
from qwenvl_pd import LLM  # noqa: E402
from qwenvl_pd.model_config import ModelConfig  # noqa: E402
from qwenvl_pd.engine.engine_config import EngineConfig  # noqa: E402
from qwenvl_pd.engine.llm_engine import LLMEngine  # noqa: E402
from qwenvl_pd.engine.sequence import Sequence  # noqa: E402
from qwenvl_pd.model.tiny import make_tiny  # noqa: E402
from qwenvl_pd.sampling_params import SamplingParams  # noqa: E402

TINY = ".cache/bench-tiny"
PARTS = ("schedule", "prepare", "sample", "other")
WARM_UP = 4  # untimed decode steps


class StandIn(torch.nn.Module):
    """The model's interface at no cost: zeros for hidden states, fixed rows for logits."""

    def __init__(self, config: ModelConfig, rows: int):
        super().__init__()
        self.config = config
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # the engine reads the device off it
        self.logits = torch.randn(rows, config.text.vocab_size, generator=torch.Generator().manual_seed(0))

    def forward(self, input_ids, positions, kv_cache, meta, visual=None):
        return torch.zeros(len(input_ids), 1)

    def compute_logits(self, hidden):
        return self.logits[:len(hidden)]


def stand_in_config(vocab: int) -> ModelConfig:
    if not Path(TINY, "config.json").exists():
        make_tiny("qwen2_5_vl", TINY)
    cfg = ModelConfig.from_hf(TINY)
    # one layer of one 1-wide KV head: a 131k-block region stays small, its bookkeeping does not
    text = dataclasses.replace(cfg.text, num_layers=1, num_kv_heads=1, head_dim=1, vocab_size=vocab)
    return dataclasses.replace(cfg, text=text)


def decoding_engine(config: ModelConfig, batch: int, pool: int, steps: int) -> LLMEngine:
    """An engine whose `batch` sequences are all prefilled, so every next step is decode-only."""
    engine = LLMEngine(StandIn(config, batch), config,
                       EngineConfig(num_kv_blocks=pool, max_num_seqs=256, max_num_batched_tokens=8192,
                                    decode_graphs="off"), torch.float32)
    rng = np.random.default_rng(batch)
    params = SamplingParams(max_tokens=WARM_UP + steps + 2, temperature=0, ignore_eos=True)
    for i in range(batch):
        n = int(rng.integers(64, 193))
        tokens = rng.integers(0, config.text.vocab_size, n).tolist()
        engine.add(Sequence(str(i), tokens, torch.arange(n).expand(3, n), 0, params))
    while engine.scheduler.waiting or any(s.num_computed < s.prompt_len for s in engine.scheduler.running):
        engine.step()
    for _ in range(WARM_UP):  # first calls at a new batch shape pay one-off costs
        engine.step()
    gc.collect()
    return engine


def timed(fn, into: dict, key: str):
    def wrapper(*a, **k):
        t = time.perf_counter()
        out = fn(*a, **k)
        into[key] = into.get(key, 0.0) + time.perf_counter() - t
        return out
    return wrapper


def time_steps(engine: LLMEngine, steps: int) -> dict[str, float]:
    """Seconds per decode step: non-model total and its parts ("other": postprocess, sealing)."""
    spent: dict[str, float] = {}
    model, runner, sched = engine.model, engine.runner, engine.scheduler
    model.forward = timed(model.forward, spent, "model")
    model.compute_logits = timed(model.compute_logits, spent, "model")
    sched.schedule = timed(sched.schedule, spent, "schedule")
    runner.run = timed(runner.run, spent, "run")
    inner_sample = llm_engine.sample
    llm_engine.sample = timed(inner_sample, spent, "sample")
    step = timed(engine.step, spent, "step")
    try:
        for _ in range(steps):
            step()
    finally:
        llm_engine.sample = inner_sample
    total = spent["step"] - spent["model"]
    prepare = spent["run"] - spent["model"]
    parts = {"schedule": spent["schedule"], "prepare": prepare, "sample": spent["sample"]}
    parts["other"] = total - sum(parts.values())
    return {k: v / steps for k, v in (parts | {"total": total}).items()}


def overhead_table(batches: list[int], pools: list[int], steps: int, vocab: int) -> None:
    config = stand_in_config(vocab)
    print(f"non-model ms per decode step (stand-in model, vocab {vocab}, {steps} steps, block size "
          f"16, prompts 64-192 tokens, torch threads {torch.get_num_threads()})")
    print(f"{'batch':>6} {'pool':>8} " + " ".join(f"{p:>9}" for p in PARTS) + f" {'total':>9}")
    for batch in batches:
        totals = []
        for pool in pools:
            ms = {k: v * 1e3 for k, v in time_steps(decoding_engine(config, batch, pool, steps), steps).items()}
            totals.append(ms["total"])
            print(f"{batch:6} {pool:8} " + " ".join(f"{ms[p]:9.3f}" for p in PARTS) + f" {ms['total']:9.3f}")
        print(f"{'':6} largest / smallest pool: {max(totals[-1], totals[0]) / min(totals[-1], totals[0]):.2f}x")


def tiny_tok_s(pools: list[int], requests: int, rounds: int) -> None:
    """Best of `rounds` timed runs per pool, the pools taking turns so that a shared machine's
    drift falls on all of them; a full untimed run first fills the encoder and prefix caches."""
    if not Path(TINY, "config.json").exists():
        make_tiny("qwen2_5_vl", TINY)
    llms = [LLM(model=TINY, max_model_len=4096, num_kv_blocks=pool) for pool in pools]
    reqs, params = workload(requests, llms[0].tokenizer)
    for llm in llms:
        llm.generate(reqs, params)
    rates = [0.0] * len(pools)
    for _ in range(rounds):
        for i, llm in enumerate(llms):
            t = time.perf_counter()
            outs = llm.generate(reqs, params)
            elapsed = time.perf_counter() - t
            rates[i] = max(rates[i], sum(len(o.outputs[0].token_ids) for o in outs) / elapsed)
    print(f"\nwhole engine, tiny checkpoint ({TINY}), {requests} mixed requests, best of {rounds}, "
          f"torch threads {torch.get_num_threads()}")
    print(" ".join(f"{f'{p} blocks tok/s':>20}" for p in pools) + f" {'last / first':>13}")
    print(" ".join(f"{r:20.1f}" for r in rates) + f" {rates[-1] / rates[0]:12.1%}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256])
    ap.add_argument("--pools", type=int, nargs="+", default=[4096, 32768, 131072])
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--tiny-pools", type=int, nargs="+", default=[2048, 131072])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-tiny", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch threads; 0 keeps the default")
    args = ap.parse_args()
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    # the host side of a step is Python and small tensor ops: on a shared machine more threads
    # time the OpenMP hand-offs of other processes' load, not the bookkeeping
    torch.set_num_threads(args.threads or threads)
    overhead_table(args.batches, args.pools, args.steps, args.vocab)
    torch.set_num_threads(threads)  # the whole engine runs as it would be deployed
    if not args.skip_tiny:
        tiny_tok_s(args.tiny_pools, args.requests, args.rounds)


if __name__ == "__main__":
    main()

"""This machine's bounds and a dense Qwen text stack's work, for benchmarks/vs_vllm.py.

Bounds: the GEMM rate (F.linear on an MLP-sized problem, best of 10) in bf16 and float32, and
the memory bandwidth (summing a 256 MiB tensor: read only, as decode's weight reads are). On a
shared machine both are what the cores gave at that moment (a fraction above 1 says so).
Work: prefill FLOPs (2 x linear params per token, causal attention, last-token logits; the
vision tower's apart: patch embedding, blocks with full or windowed attention, merger) and decode steps, each bounded by the larger of its bytes over the
bandwidth (every linear weight and lm_head once, plus each running sequence's KV) and its FLOPs
over the GEMM rate (from ~16 sequences a step on this CPU does more arithmetic than the
bandwidth feeds), so a timing becomes a fraction of what the hardware allows. Bounds are
measured per thread count: a system on one core (vLLM's default worker here, PD's decode) is
held to what one core gives.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Bounds:
    gflops: dict[str, float]   # dtype name -> GEMM GFLOP/s
    gbps: float                # read bandwidth, GB/s


def measure_per_threads(counts: list[int]) -> dict[int, Bounds]:
    """Bounds at each torch thread count (the current count restored after)."""
    before, out = torch.get_num_threads(), {}
    try:
        for n in sorted(set(counts)):
            torch.set_num_threads(n)
            out[n] = measure()
    finally:
        torch.set_num_threads(before)
    return out


def measure(m: int = 1024, k: int = 1024, n: int = 4096, repeats: int = 10) -> Bounds:
    gflops = {}
    for dtype in (torch.bfloat16, torch.float32):
        x, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
        gflops[str(dtype).removeprefix("torch.")] = 2 * m * k * n / _best(lambda: F.linear(x, w), repeats) / 1e9
    a = torch.ones(64 << 20)  # 256 MiB of float32
    return Bounds(gflops, a.numel() * 4 / _best(a.sum, repeats) / 1e9)


def _best(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


@dataclass(frozen=True)
class TextStack:
    layers: int
    linear_params: int  # per layer: q, k, v, o and the MLP
    lm_head: int
    heads: int
    kv_heads: int
    head_dim: int

    @staticmethod
    def from_checkpoint(model_dir: str | Path) -> "TextStack":
        c = json.loads((Path(model_dir) / "config.json").read_text())
        c = c.get("text_config", c)
        h, heads, kv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
        d = c.get("head_dim") or h // heads
        per_layer = h * heads * d * 2 + h * kv * d * 2 + 3 * h * c["intermediate_size"]
        return TextStack(c["num_hidden_layers"], per_layer, c["vocab_size"] * h, heads, kv, d)

    def prefill_flops(self, lens: list[int]) -> float:
        linear = sum(2 * self.layers * self.linear_params * n + 2 * self.lm_head for n in lens)
        attention = sum(2 * self.layers * n * (n + 1) * self.heads * self.head_dim for n in lens)
        return float(linear + attention)

    def weight_bytes(self, elt: int) -> int:
        return (self.layers * self.linear_params + self.lm_head) * elt

    def kv_bytes(self, tokens: int, elt: int) -> int:
        return tokens * self.layers * 2 * self.kv_heads * self.head_dim * elt

    def step_seconds(self, contexts: list[int], bounds: Bounds, dtype: str) -> float:
        """The roofline time of one decode step of sequences at these context lengths."""
        elt = 2 if dtype != "float32" else 4
        read = self.weight_bytes(elt) + self.kv_bytes(sum(contexts), elt)
        flops = len(contexts) * 2 * (self.layers * self.linear_params + self.lm_head) + sum(
            4 * self.layers * self.heads * self.head_dim * c for c in contexts)
        return max(read / bounds.gbps, flops / bounds.gflops[dtype]) / 1e9

    def decode_seconds(self, lens: list[int], output: int, bounds: Bounds, dtype: str) -> float:
        """All sequences in one batch, `output - 1` steps after the prefill's token."""
        return sum(self.step_seconds([n + i for n in lens], bounds, dtype) for i in range(1, output))


@dataclass(frozen=True)
class VisionStack:
    """A Qwen2.5-VL / Qwen3-VL vision tower's shape, for its FLOPs per image."""
    depth: int
    hidden: int
    intermediate: int
    patch_in: int        # channels x temporal patch x patch x patch: one patch's inputs
    patch: int           # px
    merge: int           # patches per merged token, per side
    out_hidden: int
    window: int          # patches per attention window, per side (0: every block attends fully)
    full_blocks: tuple[int, ...]

    @staticmethod
    def from_checkpoint(model_dir: str | Path) -> "VisionStack":
        c = json.loads((Path(model_dir) / "config.json").read_text())["vision_config"]
        patch, merge = c["patch_size"], c["spatial_merge_size"]
        window = c.get("window_size", 0) // patch
        full = tuple(c.get("fullatt_block_indexes", range(c["depth"]))) if window else tuple(range(c["depth"]))
        return VisionStack(c["depth"], c["hidden_size"], c["intermediate_size"],
                           c.get("in_chans", c.get("in_channels", 3)) * c.get("temporal_patch_size", 2) * patch ** 2,
                           patch, merge, c.get("out_hidden_size", c["hidden_size"]), window, full)

    def flops(self, px: int) -> float:
        """One square image of px sides (a multiple of patch x merge)."""
        n, h = (px // self.patch) ** 2, self.hidden
        linear = 2 * n * (self.patch_in * h + self.depth * (4 * h * h + 3 * h * self.intermediate))
        keys = [n if b in self.full_blocks else min(n, self.window ** 2) for b in range(self.depth)]
        attention = sum(4 * n * k * h for k in keys)
        wide = h * self.merge ** 2
        merger = 2 * (n // self.merge ** 2) * (wide * wide + wide * self.out_hidden)
        return float(linear + attention + merger)


def offline_fractions(stack: TextStack, bounds: Bounds, dtype: str, r: dict, output: int,
                      vision_flops: float = 0.0) -> tuple[float, float | None]:
    """(prefill FLOP/s / GEMM rate, decode roofline time / decode time) of one vs_vllm_offline
    result; vision_flops: the prefill pass's images through the tower. Decode time is the whole
    run less the prefill-only pass over other prompts of the workload; None where that pass took
    longer (images of other sizes: no estimate)."""
    flops = stack.prefill_flops(r["prefill_lens"]) + vision_flops
    prefill = flops / r["prefill_s"] / 1e9 / bounds.gflops[dtype]
    decode_s = r["total_s"] - r["prefill_s"]
    if decode_s <= 0.05 * r["total_s"]:
        return prefill, None
    return prefill, stack.decode_seconds(r["lens"], output, bounds, dtype) / decode_s


def online_decode_fraction(stack: TextStack, bounds: Bounds, dtype: str, tpot_ms: float,
                           concurrency: int, context: int) -> float:
    """One step of `concurrency` sequences at `context` tokens each, every median TPOT."""
    return stack.step_seconds([context] * concurrency, bounds, dtype) / (tpot_ms / 1e3)

"""This machine's bounds and a dense Qwen text stack's work, for benchmarks/vs_vllm.py.

Bounds: the GEMM rate (F.linear on an MLP-sized problem, best of 10) in bf16 and float32, and
the memory bandwidth (summing a 256 MiB tensor: read only, as decode's weight reads are). On a
shared machine both are what the cores gave at that moment (a fraction above 1 says so).
Work: prefill FLOPs (2 x linear params per token, causal attention, last-token logits; the
vision tower left out) and decode bytes (every linear weight and lm_head once per step, plus each
running sequence's KV), so a timing becomes a fraction of what the hardware allows.
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

    def decode_bytes(self, lens: list[int], output: int, elt: int) -> float:
        """All sequences in one batch, `output - 1` steps after the prefill's token."""
        steps = max(0, output - 1)
        kv_tokens = sum(n * steps + steps * (steps + 1) // 2 for n in lens)
        return float(steps * self.weight_bytes(elt) + self.kv_bytes(kv_tokens, elt))


def offline_fractions(stack: TextStack, bounds: Bounds, dtype: str, r: dict, output: int) -> tuple[float, float]:
    """(prefill FLOP/s / GEMM rate, decode bytes/s / bandwidth) of one vs_vllm_offline result."""
    elt = 2 if dtype != "float32" else 4
    prefill = stack.prefill_flops(r["prefill_lens"]) / r["prefill_s"] / 1e9 / bounds.gflops[dtype]
    decode_s = max(1e-9, r["total_s"] - r["prefill_s"])
    decode = stack.decode_bytes(r["lens"], output, elt) / decode_s / 1e9 / bounds.gbps
    return prefill, decode


def online_decode_fraction(stack: TextStack, bounds: Bounds, dtype: str, tpot_ms: float,
                           concurrency: int, context: int) -> float:
    """One step of `concurrency` sequences at `context` tokens each, every median TPOT."""
    elt = 2 if dtype != "float32" else 4
    step = stack.weight_bytes(elt) + stack.kv_bytes(concurrency * context, elt)
    return step / (tpot_ms / 1e3) / 1e9 / bounds.gbps

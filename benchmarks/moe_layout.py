"""MoE expert layout on CPU: the released [E, in, out] (`x @ w`) against nn.Linear's [E, out, in]
(F.linear), per dtype, for a decode-sized and a prefill-sized batch of tokens.

    .venv/bin/python benchmarks/moe_layout.py [--experts 64 --hidden 2048 --inter 768 --top-k 8]

Prints ms per SparseMoE forward (median of --repeat) and the speed-up of the layout pack() sets.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from qwenvl_pd.model.layers.moe import SparseMoE


def timed(moe: SparseMoE, x: torch.Tensor, repeat: int) -> float:
    moe(x)  # warm-up: oneDNN primitives
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        moe(x)
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def build(args, dtype: torch.dtype) -> SparseMoE:
    torch.manual_seed(0)
    moe = SparseMoE(args.hidden, args.inter, args.experts, args.top_k).to(dtype)
    for p in moe.parameters():
        p.data.normal_(0, 0.02)
    return moe


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inter", type=int, default=768)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--tokens", type=int, nargs="+", default=[16, 512])
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    print(f"{'dtype':9} {'tokens':>6} {'[E,in,out] ms':>14} {'[E,out,in] ms':>14} {'speed-up':>9}")
    for dtype in (torch.float32, torch.bfloat16):
        moe = build(args, dtype)
        for n in args.tokens:
            x = torch.randn(n, args.hidden, dtype=dtype)
            moe.experts.linear_layout = False
            before = timed(moe, x, args.repeat)
            moe.experts.pack()
            after = timed(moe, x, args.repeat)
            moe = build(args, dtype)
            print(f"{str(dtype).split('.')[1]:9} {n:6} {before:14.2f} {after:14.2f} {before / after:9.2f}")


if __name__ == "__main__":
    main()

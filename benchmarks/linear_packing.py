"""F.linear against the packed linears the CPU engine uses, per weight shape and token count,
and over a whole decode step's weights.

    python benchmarks/linear_packing.py [--hidden 1024] [--intermediate 4096] [--vocab 151936]
                                        [--layers 24] [--dtype float32|bfloat16] [--threads N]

Shapes are one decoder layer's fused q/k/v (Qwen2.5-VL's 16 heads, 4 KV heads), o_proj, fused
gate/up, down_proj, and the lm_head: milliseconds per call with the weight in cache, for
F.linear, oneDNN's blocked layout and (bf16 on AVX512-BF16) the dot kernel (csrc/bf16_linear.c).
Then the step table: every linear of --layers layers and the lm_head, each its own weight, so
the weights stream from memory as in a decode step (GFLOP/s and GB/s of weight read).
"""
import argparse
import time

import torch
import torch.nn.functional as F

from qwenvl_pd.model.layers import bf16_linear


def per_call_ms(fn, reps: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1e3


def paths(weight: torch.Tensor) -> dict:
    """name -> x [m, k] -> [m, n], for each path that runs here."""
    onednn = torch.ops.mkldnn._reorder_linear_weight(weight, 32)
    out = {"F.linear": lambda x: F.linear(x, weight),
           "oneDNN": lambda x: torch.ops.mkldnn._linear_pointwise(x, onednn, None, "none", [], "")}
    if weight.dtype == torch.bfloat16 and bf16_linear.available():
        packed, n = bf16_linear.pack(weight), weight.shape[0]
        out["dot kernel"] = lambda x: bf16_linear.linear(x, packed, n, None)
    return out


def per_shape(shapes: dict, tokens: list[int], dtype: torch.dtype) -> None:
    names = list(paths(torch.zeros(32, 32, dtype=dtype)))
    print(f"{'weight':8} {'in x out':>14} {'tokens':>6} " + " ".join(f"{n + ' ms':>14}" for n in names))
    for name, (n_in, n_out) in shapes.items():
        fns = paths(torch.randn(n_out, n_in, dtype=dtype) * 0.05)
        for t in tokens:
            if name == "lm_head" and t > 32:
                continue  # the engine computes logits only at each sequence's last token
            x = torch.randn(t, n_in, dtype=dtype)
            reps = max(3, int(2e9 / (2 * t * n_in * n_out)))
            ms = [per_call_ms(lambda: fn(x), reps) for fn in fns.values()]
            print(f"{name:8} {f'{n_in}x{n_out}':>14} {t:6} " + " ".join(f"{m:14.3f}" for m in ms))


def per_step(shapes: dict, layers: int, tokens: list[int], dtype: torch.dtype) -> None:
    stack = [shapes[s] for s in ("qkv", "o_proj", "gate_up", "down")] * layers + [shapes["lm_head"]]
    fns = [paths(torch.randn(n_out, n_in, dtype=dtype) * 0.05) for n_in, n_out in stack]
    params = sum(i * o for i, o in stack)
    print(f"\ndecode step: {layers} layers + lm_head, {params * dtype.itemsize / 1e9:.2f} GB of weights")
    for t in tokens:
        xs = {n_in: torch.randn(t, n_in, dtype=dtype) for n_in, _ in stack}
        cells = []
        for name in fns[0]:
            ms = min(per_call_ms(lambda: [f[name](xs[i]) for f, (i, _) in zip(fns, stack)], 2)
                     for _ in range(2))
            cells.append(f"{name} {ms:6.1f} ms {2 * params * t / ms / 1e6:4.0f} GF/s "
                         f"{params * dtype.itemsize / ms / 1e6:4.1f} GB/s")
        print(f"{t:4} tokens: " + " | ".join(cells))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32, 256, 2048])
    ap.add_argument("--step-tokens", type=int, nargs="+", default=[1, 8, 16, 32])
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    h, i = args.hidden, args.intermediate
    shapes = {"qkv": (h, h * 3 // 2), "o_proj": (h, h), "gate_up": (h, 2 * i), "down": (i, h),
              "lm_head": (h, args.vocab)}
    print(f"torch threads {torch.get_num_threads()}, {args.dtype}")
    per_shape(shapes, args.tokens, dtype)
    per_step(shapes, args.layers, args.step_tokens, dtype)


if __name__ == "__main__":
    main()

"""F.linear against the oneDNN-packed linears the CPU engine uses, per weight shape and token count.

    python benchmarks/linear_packing.py [--hidden 1024] [--intermediate 2816] [--vocab 151936]
                                        [--dtype float32|bfloat16] [--threads N]

Shapes are one decoder layer's fused q/k/v (Qwen2.5-VL's 16 heads, 4 KV heads), o_proj, fused
gate/up, down_proj, and the lm_head. Prints milliseconds per call and the speed-up.
"""
import argparse
import time

import torch
import torch.nn.functional as F

from qwenvl_pd.model.layers.linear import Linear, PackedWeights


def per_call_ms(fn, reps: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 19, 32, 128, 512, 2048])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    h, i = args.hidden, args.intermediate
    shapes = {"qkv": (h, h * 3 // 2), "o_proj": (h, h), "gate_up": (h, 2 * i), "down": (i, h),
              "lm_head": (h, args.vocab)}
    print(f"torch threads {torch.get_num_threads()}, {args.dtype}")
    print(f"{'weight':8} {'in x out':>14} {'tokens':>6} {'F.linear ms':>12} {'packed ms':>10} {'speed-up':>9}")
    for name, (n_in, n_out) in shapes.items():
        layer = Linear(n_in, n_out, bias=False).to(dtype)
        weight = layer.weight.detach().clone()
        packed = PackedWeights(layer)  # whatever can_pack says: this measures whether it should
        for t in args.tokens:
            if name == "lm_head" and t > 32:
                continue  # the engine computes logits only at each sequence's last token
            x = torch.randn(t, n_in, dtype=dtype)
            reps = max(3, int(2e9 / (2 * t * n_in * n_out)))
            plain = per_call_ms(lambda: F.linear(x, weight), reps)
            fast = per_call_ms(lambda: packed(x)[0], reps)
            print(f"{name:8} {f'{n_in}x{n_out}':>14} {t:6} {plain:12.2f} {fast:10.2f} {plain / fast:8.2f}x")


if __name__ == "__main__":
    main()

"""TTFT and the first-to-second-token gap with the whole-KV pull against layer-wise streaming,
through real prefill and decode nodes (Mooncake TCP on loopback).

    python benchmarks/kv_layerwise.py [--tokens 128,4096] [--reps 3] [--group 1]

Whole: decode pulls all layers after prefill has answered. Layer-wise: decode allocates on
PrefillStream's announce and reads each group of layers (every --group layers, every chunk)
while prefill computes, so after the first token only the last group is left to read. The first
token is prefill's in both (TTFT); the gap to the second is what the handoff costs the client.
The model is a random wide-KV checkpoint (4 layers x 8 KV heads x 128, float32: 32 KiB a token)
so that prompts of thousands of tokens prefill quickly on a CPU; prefill runs 512-token chunks.
"""
import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))
from nodes import pd_backend, pd_pair  # noqa: E402

from qwenvl_pd import SamplingParams  # noqa: E402
from qwenvl_pd.messages import PrefillRequest  # noqa: E402
from qwenvl_pd.model.tiny import make_tiny  # noqa: E402

WIDE_KV = dict(hidden_size=1024, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
               num_key_value_heads=8, mrope_section=[16, 24, 24])
NODE_ARGS = ("--max-model-len", "8192", "--kv-cache-gib", "1.5", "--max-num-batched-tokens", "512")


async def one(p_addr: str, d_addr: str, tokens: int, rid: str, layerwise: bool) -> tuple[float, float]:
    """(TTFT, second token - first token) in seconds for one request of `tokens` prompt tokens,
    through the proxy's PDBackend."""
    req = PrefillRequest(request_id=rid, prompt_token_ids=tuple(range(1000 + len(rid), 1000 + len(rid) + tokens)),
                         sampling=SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    async with pd_backend([p_addr], [d_addr], layerwise) as backend:
        start, stamps = time.perf_counter(), []
        async for _ in backend.generate(req, rid.encode()):
            stamps.append(time.perf_counter() - start)
    return stamps[0], stamps[1] - stamps[0]


def measure(p_addr: str, d_addr: str, tokens: int, reps: int) -> dict:
    out = {}
    for mode in ("whole", "layerwise"):
        asyncio.run(one(p_addr, d_addr, tokens, f"warm-{mode}-{tokens}", mode == "layerwise"))
        runs = [asyncio.run(one(p_addr, d_addr, tokens, f"{mode}-{tokens}-{i}-{'x' * i}", mode == "layerwise"))
                for i in range(reps)]  # distinct prompts: no prefix-cache hits
        out[mode] = tuple(statistics.median(r[k] for r in runs) * 1000 for k in (0, 1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="128,4096")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--group", type=int, default=1, help="prefill's --kv-layer-group")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = str(make_tiny("qwen2_5_vl", Path(tmp) / "wide", text_overrides=WIDE_KV))
        with pd_pair(model, prefill_args=(*NODE_ARGS, "--kv-layer-group", str(args.group)),
                     decode_args=NODE_ARGS) as ((_, p_addr), (_, d_addr)):
            rows = [(n, measure(p_addr, d_addr, n, args.reps)) for n in map(int, args.tokens.split(","))]
    print(f"median of {args.reps}, ms; layer group {args.group} of 4 layers, 512-token prefill chunks")
    print(f"{'tokens':>7} | {'TTFT whole':>10} {'TTFT lw':>8} | {'gap whole':>9} {'gap lw':>7} | "
          f"{'2nd tok whole':>13} {'2nd tok lw':>10}")
    for n, r in rows:
        (tw, gw), (tl, gl) = r["whole"], r["layerwise"]
        print(f"{n:>7} | {tw:>10.1f} {tl:>8.1f} | {gw:>9.1f} {gl:>7.1f} | {tw + gw:>13.1f} {tl + gl:>10.1f}")


if __name__ == "__main__":
    main()

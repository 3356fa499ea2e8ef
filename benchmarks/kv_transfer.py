"""KV handoff bandwidth through real prefill and decode nodes against a raw Mooncake read of the
same bytes between two processes on the same transport.

    python benchmarks/kv_transfer.py [--tokens 128,512,2048,4096] [--reps 5]

A handoff is what the decode node times around its pull: block allocation, the coalesced slice
list and the batched Mooncake read (GetLoad's kv_transfer_seconds_total). The model is a random
checkpoint with few layers and a wide KV (4 layers x 8 KV heads x 128, float32: 32 KiB a token)
so that prompts of thousands of tokens prefill quickly on a CPU.
"""
import argparse
import asyncio
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))
from nodes import pd_generate, pd_pair  # noqa: E402

from qwenvl_pd import SamplingParams  # noqa: E402
from qwenvl_pd.kv_transfer.transfer_engine import KVTransferEngine  # noqa: E402
from qwenvl_pd.kv_transfer.peer import spawn_peer  # noqa: E402
from qwenvl_pd.messages import PrefillRequest  # noqa: E402
from qwenvl_pd.model.tiny import make_tiny  # noqa: E402
from qwenvl_pd.proxy.cluster import pd_client  # noqa: E402
from qwenvl_pd.proxy.cluster.instance import Instance  # noqa: E402

WIDE_KV = dict(hidden_size=1024, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
               num_key_value_heads=8, mrope_section=[16, 24, 24])


async def handoff(p_addr: str, d_addr: str, tokens: int, rid: str) -> tuple[float, int]:
    d = Instance.connect("decode", d_addr)
    before = await pd_client.load(d, "decode")
    req = PrefillRequest(request_id=rid, prompt_token_ids=tuple(range(1000, 1000 + tokens)),
                         sampling=SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    await pd_generate(p_addr, d_addr, req)
    after = await pd_client.load(d, "decode")
    await d.channel.close()
    return (after.kv_transfer_seconds_total - before.kv_transfer_seconds_total,
            after.kv_transfer_bytes_total - before.kv_transfer_bytes_total)


def raw_read(nbytes: int, reps: int) -> float:
    """Median seconds of one single-slice Mooncake read of nbytes between two processes."""
    elements = nbytes // 4
    with spawn_peer((1, 2, 1, 1, 1, elements // 2), fill="ones") as peer:
        local = torch.zeros(elements, dtype=torch.float32)
        with KVTransferEngine("127.0.0.1", "tcp") as engine:
            addr = engine.register(local)
            times = []
            for _ in range(reps):
                t = time.perf_counter()
                engine.read(peer.session, addr, peer.region.base, nbytes)
                times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="128,512,2048,4096")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    model = Path(".cache/bench-widekv")
    if not (model / "config.json").exists():
        make_tiny("qwen2_5_vl", model, text_overrides=WIDE_KV)
    lengths = [int(t) for t in args.tokens.split(",")]
    rows = []
    with pd_pair(str(model), prefill_args=("--kv-cache-gib", "1", "--max-model-len", "8192"),
                 decode_args=("--kv-cache-gib", "1", "--max-model-len", "8192")) as ((_, p), (_, d)):
        for n in lengths:
            runs = [asyncio.run(handoff(p, d, n, f"b{n}-{i}")) for i in range(args.reps)]
            seconds = sorted(s for s, _ in runs)[len(runs) // 2]
            rows.append((n, runs[0][1], seconds))
    print(f"\n{'prompt tokens':>13} {'KV bytes':>12} {'handoff ms':>11} {'handoff GiB/s':>14} "
          f"{'raw ms':>8} {'raw GiB/s':>10} {'handoff/raw':>12} {'overhead ms':>12}")
    for n, nbytes, seconds in rows:
        raw = raw_read(nbytes, args.reps)
        print(f"{n:13d} {nbytes:12d} {seconds * 1e3:11.2f} {nbytes / seconds / 2**30:14.2f} "
              f"{raw * 1e3:8.2f} {nbytes / raw / 2**30:10.2f} {raw / seconds:11.0%} "
              f"{(seconds - raw) * 1e3:12.2f}")
    print("overhead ms = handoff - raw read of the same bytes: the fixed cost of the handoff path")


if __name__ == "__main__":
    main()

"""Raw Mooncake read bandwidth between two processes: the baseline KV pulls are compared against.

A peer process registers a region and serves it; this process registers its own region and
reads N bytes (a) as one slice and (b) as N / slice_kib slices in one batch call, the shape a
badly fragmented KV pull would have. Every read is checked (the peer's region is all ones).

    .venv/bin/python benchmarks/kv_transfer_raw.py                  # tcp on loopback, < 1 min
    .venv/bin/python benchmarks/kv_transfer_raw.py --sizes-mib 1 16 --slice-kib 4 --reps 5
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("GLOG_minloglevel", "2")  # keep Mooncake's INFO/WARNING chatter off the table

import torch  # noqa: E402

from qwenvl_pd.kv_transfer.transfer_engine import KVTransferEngine  # noqa: E402
from qwenvl_pd.kv_transfer.peer import spawn_peer  # noqa: E402

MiB = 1 << 20


def timed_read(engine: KVTransferEngine, session: str, local: torch.Tensor, remote_base: int,
               nbytes: int, slice_bytes: int) -> float:
    """Seconds for one batch call moving nbytes in slices of slice_bytes; checks the bytes landed."""
    local.zero_()
    base = local.data_ptr()
    slices = [(base + off, remote_base + off, min(slice_bytes, nbytes - off))
              for off in range(0, nbytes, slice_bytes)]
    t0 = time.perf_counter()
    engine.read_batch(session, slices)
    dt = time.perf_counter() - t0
    n = nbytes // local.element_size()
    if int(local[:n].sum().item()) != n or local[n:n + 1].sum().item() != 0:
        raise AssertionError(f"read of {nbytes} B in {len(slices)} slices moved the wrong bytes")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-mib", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    ap.add_argument("--slice-kib", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5, help="timed reads per cell (after one warm-up)")
    ap.add_argument("--protocol", default="tcp")
    ap.add_argument("--host", default="127.0.0.1")
    args = ap.parse_args()

    region_bytes = max(args.sizes_mib) * MiB + 4  # + one float so "nothing beyond n" is checkable
    shape = (1, 2, 1, 1, 1, region_bytes // 8 + 1)  # any 6-d float32 shape of enough bytes
    local = torch.zeros(region_bytes // 4 + 2, dtype=torch.float32)
    t_start = time.perf_counter()
    with spawn_peer(shape, fill="ones", host=args.host, protocol=args.protocol) as peer, \
            KVTransferEngine(args.host, args.protocol, timeout_s=30.0) as engine:
        engine.register(local)
        print(f"# raw Mooncake read, {args.protocol} {args.host}, peer in another process; "
              f"median of {args.reps} after 1 warm-up; GiB/s = 2**30 B/s")
        print(f"| size | 1 slice: ms | 1 slice: GiB/s | {args.slice_kib} KiB slices | batch: ms "
              f"| batch: GiB/s | batch/1 slice |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for mib in args.sizes_mib:
            nbytes, row = mib * MiB, []
            for slice_bytes in (nbytes, args.slice_kib * 1024):
                times = [timed_read(engine, peer.session, local, peer.region.base, nbytes, slice_bytes)
                         for _ in range(args.reps + 1)][1:]
                row.append(statistics.median(times))
            single, batch = row
            gib = nbytes / 2**30
            print(f"| {mib} MiB | {single * 1e3:.2f} | {gib / single:.2f} | "
                  f"{-(-nbytes // (args.slice_kib * 1024))} | {batch * 1e3:.2f} | {gib / batch:.2f} | "
                  f"{single / batch:.2f} |", flush=True)
        peer.stop()
    print(f"# total {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()

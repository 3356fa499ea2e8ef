"""A stand-alone process that registers a KV-shaped region and serves it until told to stop.

Tests and benchmarks need the remote side in another process (Mooncake shortcuts nothing then,
and a peer can really die); this is that process and the parent-side handle that starts it:

    with spawn_peer((layers, 2, blocks, kv_heads, block_size, head_dim)) as peer:
        engine.read_batch(peer.session, read_slices(local, peer.region, [3, 4], [0, 1]))

The child prints one JSON line {"session", "base", "shape", "itemsize"} once its region is
registered, then serves until its stdin closes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import select
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from qwenvl_pd.kv_transfer.layout import Region


def pattern(shape: Sequence[int]):
    """The region's contents under fill="arange": element i holds i + 1 (nonzero, exact in float32
    below 2**24 elements), so a test can recompute what any block must contain."""
    import torch
    return (torch.arange(1, math.prod(shape) + 1, dtype=torch.float32)).reshape(*shape)


@dataclass
class Peer:
    proc: subprocess.Popen
    session: str
    region: Region
    shape: tuple[int, ...]

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ask the child to exit, kill it if it does not within timeout_s."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout_s)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.kill()  # also ends a SIGSTOPped child
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.stdout.close()


def spawn_peer(shape: Sequence[int], fill: str = "arange", host: str = "127.0.0.1",
               protocol: str = "tcp", start_timeout_s: float = 60.0, quiet: bool = True) -> Peer:
    cmd = [sys.executable, "-m", "qwenvl_pd.kv_transfer.peer", "--shape", ",".join(map(str, shape)),
           "--fill", fill, "--host", host, "--protocol", protocol]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            stderr=subprocess.DEVNULL if quiet else None)
    # Bounded wait for the ready line: a child that dies or wedges must not hang the parent.
    deadline = time.monotonic() + start_timeout_s
    line, eof = "", False
    while not line.endswith("\n"):
        left = deadline - time.monotonic()
        if left <= 0 or eof:
            proc.kill()
            proc.wait(timeout=10)
            raise RuntimeError(f"peer {cmd} did not become ready (exit code {proc.returncode})")
        if select.select([proc.stdout], [], [], min(left, 0.5))[0]:
            chunk = os.read(proc.stdout.fileno(), 4096).decode()
            eof = not chunk
            line += chunk
    info = json.loads(line)
    return Peer(proc, info["session"], Region.from_shape(info["base"], info["shape"], info["itemsize"]),
                tuple(info["shape"]))


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", required=True, help="layers,2,blocks,kv_heads,block_size,head_dim")
    ap.add_argument("--fill", choices=("arange", "ones"), default="arange")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--protocol", default="tcp")
    args = ap.parse_args(argv)
    import torch

    from qwenvl_pd.kv_transfer.transfer_engine import KVTransferEngine
    shape = tuple(int(x) for x in args.shape.split(","))
    region = pattern(shape) if args.fill == "arange" else torch.ones(shape, dtype=torch.float32)
    with KVTransferEngine(args.host, args.protocol) as engine:
        base = engine.register(region)
        print(json.dumps({"session": engine.session_id, "base": base, "shape": list(shape),
                          "itemsize": region.element_size()}), flush=True)
        sys.stdin.read()  # serve (Mooncake's threads do the work) until the parent closes stdin


if __name__ == "__main__":
    main()

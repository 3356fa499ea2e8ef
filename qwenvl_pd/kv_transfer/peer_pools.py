"""Worker threads per peer, so that reads from a hung peer cannot starve reads from healthy ones.

A Mooncake read blocks its thread until the transfer ends or Mooncake's own deadline passes
(>= 5 s). With one shared pool, a few reads to a stopped prefill held every worker and the reads
queued behind them, from healthy prefills, ran out their deadlines unstarted. Here each peer has
its own small pool; pools of peers not read lately are shut once idle, so the count stays bounded.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable


class PeerPools:
    def __init__(self, per_peer: int, max_peers: int = 64):
        self.per_peer, self.max_peers = per_peer, max_peers
        self._pools: OrderedDict[str, ThreadPoolExecutor] = OrderedDict()  # least recently used first
        self._busy: dict[str, int] = {}
        self._lock = threading.Lock()

    def submit(self, peer: str, fn: Callable, *args) -> Future:
        """Run fn(*args) on one of `peer`'s workers; at most per_peer run at once for a peer."""
        with self._lock:
            self._busy[peer] = self._busy.get(peer, 0) + 1
            pool = self._pool(peer)
            fut = pool.submit(fn, *args)
        fut.add_done_callback(lambda _: self._done(peer))
        return fut

    def peers(self) -> list[str]:
        with self._lock:
            return list(self._pools)

    def shutdown(self) -> None:
        """Drop queued work and wait for running calls; no worker runs afterwards."""
        with self._lock:
            pools, self._pools = list(self._pools.values()), OrderedDict()
        for pool in pools:
            pool.shutdown(wait=True, cancel_futures=True)

    def _pool(self, peer: str) -> ThreadPoolExecutor:
        pool = self._pools.pop(peer, None) or ThreadPoolExecutor(self.per_peer, f"kv-read-{peer}")
        self._pools[peer] = pool
        self._evict_idle()
        return pool

    def _evict_idle(self) -> None:
        # beyond max_peers pools, the least recently used idle ones go; busy ones stay
        idle = [p for p in self._pools if not self._busy.get(p)]
        for peer in idle[:max(0, len(self._pools) - self.max_peers)]:
            self._pools.pop(peer).shutdown(wait=False)  # idle: no native call is running on it

    def _done(self, peer: str) -> None:
        with self._lock:
            left = self._busy[peer] - 1
            if left:
                self._busy[peer] = left
            else:
                del self._busy[peer]

"""The encode node's content-addressed embedding pool (bookkeeping; the bytes are in one
registered tensor): entries by key, least recently used first out, never an entry a lease pins
or one still being written.

Thread-safe: the encode worker reserves and publishes, the gRPC handlers lease and release,
a periodic check expires leases.
"""
from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

from qwenvl_pd.kv_transfer.arena import ALIGN, ByteArena


class PoolError(RuntimeError):
    """An entry cannot be placed: too large for the pool, or every byte is pinned."""


@dataclass
class Entry:
    key: str
    offset: int      # from the pool's base address
    nbytes: int
    num_tokens: int
    num_deepstack: int
    ready: bool = False     # bytes written: may be handed out
    in_store: bool = False  # also in the Mooncake Store
    leases: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class Lease:
    lease_id: str
    key: str
    expires_unix_ms: int


class EmbeddingPool:
    def __init__(self, capacity: int, align: int = ALIGN, clock: Callable[[], float] = time.time):
        self.arena = ByteArena(capacity, align)
        self.clock = clock  # seconds since the epoch: expiries travel in the handles
        self._entries: OrderedDict[str, Entry] = OrderedDict()  # least recently used first
        self._leases: dict[str, Lease] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._prefix = uuid.uuid4().hex[:12]  # lease ids of another run never collide with ours

    @property
    def capacity(self) -> int:
        return self.arena.capacity

    def bytes_used(self) -> int:
        with self._lock:
            return sum(self.arena.rounded(e.nbytes) for e in self._entries.values())

    def pinned(self) -> int:
        """Entries pinned now by at least one lease."""
        with self._lock:
            return sum(1 for e in self._entries.values() if e.leases)

    def keys(self) -> list[str]:
        """Ready keys, least recently used first."""
        with self._lock:
            return [k for k, e in self._entries.items() if e.ready]

    def lease_if_ready(self, key: str, seconds: float) -> tuple[Entry, Lease] | None:
        """A hit: the entry, now most recently used and pinned by a new lease; None on a miss."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or not entry.ready:
                return None
            self._entries.move_to_end(key)
            return entry, self._new_lease(entry, seconds)

    def reserve(self, key: str, nbytes: int, num_tokens: int, num_deepstack: int = 0) -> Entry:
        """Room for a new entry, evicting unpinned ready entries oldest first; not handed out
        until publish(). Raises PoolError."""
        with self._lock:
            if key in self._entries:
                raise ValueError(f"embedding {key[:16]} is already in the pool")
            offset = self._allocate(key, nbytes)
            entry = Entry(key, offset, nbytes, num_tokens, num_deepstack)
            self._entries[key] = entry
            return entry

    def publish(self, key: str, lease_seconds: list[float], in_store: bool = False) -> list[Lease]:
        """The entry's bytes are written: hand it out, with one lease per waiting caller."""
        with self._lock:
            entry = self._entries[key]
            entry.ready, entry.in_store = True, in_store
            self._entries.move_to_end(key)
            return [self._new_lease(entry, s) for s in lease_seconds]

    def drop(self, key: str) -> None:
        """A reserved entry whose bytes could not be written."""
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self._free(entry)

    def release(self, lease_ids: list[str]) -> int:
        """Unpin these leases -> how many were live."""
        with self._lock:
            return sum(self._end_lease(i) for i in lease_ids)

    def expire(self) -> int:
        """Unpin every lease past its expiry -> how many."""
        now_ms = int(self.clock() * 1000)
        with self._lock:
            gone = [i for i, lease in self._leases.items() if lease.expires_unix_ms <= now_ms]
            return sum(self._end_lease(i) for i in gone)

    def _new_lease(self, entry: Entry, seconds: float) -> Lease:
        lease = Lease(f"{self._prefix}-{next(self._ids)}", entry.key,
                      int((self.clock() + seconds) * 1000))
        self._leases[lease.lease_id] = lease
        entry.leases.add(lease.lease_id)
        return lease

    def _end_lease(self, lease_id: str) -> bool:
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return False
        self._entries[lease.key].leases.discard(lease_id)
        return True

    def _allocate(self, key: str, nbytes: int) -> int:
        if self.arena.rounded(nbytes) > self.arena.capacity:
            raise PoolError(f"embedding {key[:16]} needs {nbytes} bytes, more than the whole pool "
                            f"({self.arena.capacity} bytes, --embedding-cache-gib)")
        offset = self.arena.allocate(nbytes)
        victims = (e for e in list(self._entries.values()) if e.ready and not e.leases)
        while offset is None:
            victim = next(victims, None)
            if victim is None:
                raise PoolError(f"embedding pool full: {nbytes} bytes wanted, the rest of its "
                                f"{self.arena.capacity} bytes is pinned by leases or being written")
            del self._entries[victim.key]
            self._free(victim)
            offset = self.arena.allocate(nbytes)
        return offset

    def _free(self, entry: Entry) -> None:
        self.arena.free(entry.offset, entry.nbytes)
        for lease_id in entry.leases:
            self._leases.pop(lease_id, None)

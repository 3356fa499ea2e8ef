"""A host buffer registered once with the prefill's transfer engine, cut into slots that
embedding reads land in; the caller copies a slot out and frees it (a timed-out read frees its
slot only once Mooncake's call has settled: until then it may still write there)."""
from __future__ import annotations

import asyncio
import threading
import time

import torch

from qwenvl_pd.kv_transfer.arena import ByteArena


class ScratchFull(Exception):
    """No slot of the asked size came free before the deadline."""


class Scratch:
    def __init__(self, transfer, nbytes: int):
        self.tensor = torch.empty(nbytes, dtype=torch.uint8)  # [nbytes]
        self.base = transfer.register(self.tensor)
        self._arena = ByteArena(nbytes)  # 64-byte aligned: every slot can be viewed as any dtype
        self._lock = threading.Lock()  # settled reads free from Mooncake's worker threads
        self._loop = asyncio.get_running_loop()
        self._freed = asyncio.Event()

    @property
    def size(self) -> int:
        return self._arena.capacity

    @property
    def free_bytes(self) -> int:
        with self._lock:
            return self._arena.free_bytes

    async def take(self, nbytes: int, deadline: float) -> int:
        """A slot of nbytes -> its offset; waits for frees until `deadline` (time.monotonic)."""
        if self._arena.rounded(nbytes) > self.size:
            raise ScratchFull(f"{nbytes} B exceed the {self.size} B embedding read buffer")
        while (offset := self._alloc(nbytes)) is None:
            self._freed.clear()
            try:
                await asyncio.wait_for(self._freed.wait(), max(deadline - time.monotonic(), 0))
            except asyncio.TimeoutError:
                raise ScratchFull(f"no {nbytes} B free in the embedding read buffer in time") from None
        return offset

    def view(self, offset: int, nbytes: int) -> torch.Tensor:
        return self.tensor[offset:offset + nbytes]

    def give(self, offset: int, nbytes: int) -> None:
        """Free a slot (any thread)."""
        with self._lock:
            self._arena.free(offset, nbytes)
        try:
            self._loop.call_soon_threadsafe(self._freed.set)
        except RuntimeError:  # the loop is gone (shutdown): nobody waits any more
            pass

    def _alloc(self, nbytes: int) -> int | None:
        with self._lock:
            return self._arena.allocate(nbytes)

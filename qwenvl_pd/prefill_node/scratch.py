"""A host buffer registered once with the prefill's transfer engine, cut into slots that
embedding reads land in; the caller copies a slot out and frees it (a timed-out read frees its
slot only once Mooncake's call has settled: until then it may still write there)."""
from __future__ import annotations

import asyncio
import threading
import time

import torch

ALIGN = 64  # every slot starts aligned for any dtype view


class ScratchFull(Exception):
    """No slot of the asked size came free before the deadline."""


class Scratch:
    def __init__(self, transfer, nbytes: int):
        self.tensor = torch.empty(nbytes, dtype=torch.uint8)  # [nbytes]
        self.base = transfer.register(self.tensor)
        self.size = nbytes
        self._free = [(0, nbytes)]  # (offset, length), sorted, merged
        self._lock = threading.Lock()  # settled reads free from Mooncake's worker threads
        self._loop = asyncio.get_running_loop()
        self._freed = asyncio.Event()

    @property
    def free_bytes(self) -> int:
        with self._lock:
            return sum(n for _, n in self._free)

    async def take(self, nbytes: int, deadline: float) -> int:
        """A slot of nbytes -> its offset; waits for frees until `deadline` (time.monotonic)."""
        if nbytes > self.size:
            raise ScratchFull(f"{nbytes} B exceed the {self.size} B embedding read buffer")
        while (offset := self._alloc(nbytes)) is None:
            self._freed.clear()
            left = deadline - time.monotonic()
            try:
                await asyncio.wait_for(self._freed.wait(), max(left, 0))
            except asyncio.TimeoutError:
                raise ScratchFull(f"no {nbytes} B free in the embedding read buffer in time") from None
        return offset

    def view(self, offset: int, nbytes: int) -> torch.Tensor:
        return self.tensor[offset:offset + nbytes]

    def give(self, offset: int, nbytes: int) -> None:
        """Free a slot (any thread)."""
        with self._lock:
            spans = sorted(self._free + [(offset, _rounded(nbytes))])
            merged = [spans[0]]
            for o, n in spans[1:]:
                last_o, last_n = merged[-1]
                merged[-1:] = [(last_o, last_n + n)] if last_o + last_n == o else [merged[-1], (o, n)]
            self._free = merged
        try:
            self._loop.call_soon_threadsafe(self._freed.set)
        except RuntimeError:  # the loop is gone (shutdown): nobody waits any more
            pass

    def _alloc(self, nbytes: int) -> int | None:
        need = _rounded(nbytes)
        with self._lock:
            for i, (o, n) in enumerate(self._free):
                if n >= need:
                    self._free[i:i + 1] = [(o + need, n - need)] if n > need else []
                    return o
        return None


def _rounded(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN

"""First-fit allocation of aligned byte ranges inside one fixed arena (bookkeeping only: the
bytes themselves live in the pool's registered tensor)."""
from __future__ import annotations

import bisect

ALIGN = 64  # every entry starts on a cache line: reads and writes never share one


class ByteArena:
    def __init__(self, capacity: int, align: int = ALIGN):
        if capacity < align:
            raise ValueError(f"an arena of {capacity} bytes cannot hold one {align}-byte entry")
        self.align = align
        self.capacity = capacity - capacity % align
        self._free: list[tuple[int, int]] = [(0, self.capacity)]  # (start, size), by start

    def rounded(self, nbytes: int) -> int:
        return -(-nbytes // self.align) * self.align

    @property
    def free_bytes(self) -> int:
        return sum(size for _, size in self._free)

    def allocate(self, nbytes: int) -> int | None:
        """Offset of the first free range that fits nbytes (rounded up), or None."""
        need = self.rounded(nbytes)
        for i, (start, size) in enumerate(self._free):
            if size >= need:
                if size == need:
                    del self._free[i]
                else:
                    self._free[i] = (start + need, size - need)
                return start
        return None

    def free(self, offset: int, nbytes: int) -> None:
        """Give back [offset, offset + nbytes rounded), merged with free neighbours."""
        size = self.rounded(nbytes)
        i = bisect.bisect(self._free, (offset, 0))
        if i < len(self._free) and self._free[i][0] < offset + size or \
                i > 0 and sum(self._free[i - 1]) > offset:
            raise ValueError(f"range [{offset}, +{size}) is already free")
        if i < len(self._free) and self._free[i][0] == offset + size:
            size += self._free.pop(i)[1]
        if i > 0 and sum(self._free[i - 1]) == offset:
            offset, size = self._free[i - 1][0], self._free[i - 1][1] + size
            del self._free[i - 1]
            i -= 1
        self._free.insert(i, (offset, size))

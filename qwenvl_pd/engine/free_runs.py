"""The truly free block ids of a KV region, kept as maximal runs of consecutive ids."""


class FreeRuns:
    """Runs [start, start + length) of free ids, merged with their neighbours when ids return.

    A max-tree over run starts (leaf i: the length of the run starting at i, else 0) finds the
    lowest run of at least n blocks, and the longest run, in O(log num_blocks); taking and
    returning ids touch O(1) runs each. Nothing here walks the free ids.
    """

    def __init__(self, num_blocks: int):
        self._leaves = 1 << max(num_blocks - 1, 0).bit_length()
        self._tree = [0] * (2 * self._leaves)
        self._length: dict[int, int] = {}  # start -> length
        self._start: dict[int, int] = {}   # end (exclusive) -> start
        self.count = 0                      # free ids in all runs
        self._insert(0, num_blocks)

    def take(self, n: int) -> list[int]:
        """n ids (n <= count): the lowest run that fits all n, cut from its start; else whole runs
        longest first (ties: lower id), the last one cut from its start."""
        start = self._lowest_fit(n)
        if start is not None:
            return self._cut(start, n)
        ids: list[int] = []
        while len(ids) < n:
            ids += self._cut(self._lowest_fit(self._tree[1]), n - len(ids))
        return ids

    def take_id(self, block_id: int) -> bool:
        """Take block_id if it starts a run (the id after a held one is free only then)."""
        if block_id not in self._length:
            return False
        self._cut(block_id, 1)
        return True

    def add(self, ids: list[int]) -> None:
        """Return ids (none of them free), merging each stretch of consecutive ids with its
        neighbouring runs."""
        ids = sorted(ids)
        first = 0
        for i in range(1, len(ids) + 1):
            if i == len(ids) or ids[i] != ids[i - 1] + 1:
                self._add_run(ids[first], ids[i - 1] + 1)
                first = i

    def runs(self) -> list[tuple[int, int]]:
        """(start, length) of every run, by start: for tests and reports, O(runs)."""
        return sorted(self._length.items())

    def _add_run(self, start: int, end: int) -> None:
        self.count += end - start
        if start in self._start:  # a run ends where this one starts: it grows in place
            start = self._start.pop(start)
        if end in self._length:   # a run starts where this one ends: it is absorbed
            after = self._length.pop(end)
            del self._start[end + after]
            self._set(end, 0)
            end += after
        self._length[start], self._start[end] = end - start, start
        self._set(start, end - start)

    def _insert(self, start: int, length: int) -> None:
        if length > 0:
            self._length[start], self._start[start + length] = length, start
            self._set(start, length)
            self.count += length

    def _cut(self, start: int, n: int) -> list[int]:
        """Up to n ids from the start of the run at start; the rest of the run stays free."""
        length = self._length.pop(start)
        del self._start[start + length]
        self._set(start, 0)
        self.count -= length
        k = min(n, length)
        self._insert(start + k, length - k)
        return list(range(start, start + k))

    def _lowest_fit(self, n: int) -> int | None:
        tree = self._tree
        if n <= 0 or tree[1] < n:
            return None
        node = 1
        while node < self._leaves:
            node = 2 * node if tree[2 * node] >= n else 2 * node + 1
        return node - self._leaves

    def _set(self, start: int, length: int) -> None:
        tree = self._tree
        node = start + self._leaves
        tree[node] = length
        while node > 1:
            node //= 2
            best = max(tree[2 * node], tree[2 * node + 1])
            if tree[node] == best:
                break  # nothing above changes either
            tree[node] = best

"""Block ids of one instance's paged KV region: contiguous-run allocation, ref counts, prefix cache."""
import hashlib
import struct
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from qwenvl_pd.engine.free_runs import FreeRuns

# One image/video of a prompt: its placeholder tokens are [start, end) and its content hash.
MMSpan = tuple[int, int, bytes | str]


class OutOfBlocks(RuntimeError):
    """Not enough free or evictable blocks; nothing was allocated."""


@dataclass(frozen=True)
class Allocation:
    block_ids: list[int]
    num_cached_tokens: int  # leading prompt tokens whose K/V already sit in block_ids


def block_hashes(token_ids: Sequence[int], mm_spans: Iterable[MMSpan], block_size: int,
                 first: int = 0, prev: bytes = b"") -> list[bytes]:
    """Chained sha256 of each full block from block `first` on (prev: the hash of the block
    before it): previous hash, token ids, and every multimodal item whose span meets the block
    (placeholder pads are identical for all images, the hash is not)."""
    spans = sorted(mm_spans, key=lambda s: (s[0], s[1]))
    hashes = []
    for start in range(first * block_size, len(token_ids) - block_size + 1, block_size):
        end = start + block_size
        h = hashlib.sha256(prev)
        h.update(struct.pack(f"<{block_size}q", *token_ids[start:end]))
        for s, e, item in spans:
            if s < end and e > start:
                key = item.encode() if isinstance(item, str) else bytes(item)
                # the offsets say which part of the item lies here: the same image shifted by a few
                # tokens puts other embeddings in this block, so it must not alias
                h.update(struct.pack("<qqq", s - start, e - start, len(key)) + key)
        prev = h.digest()
        hashes.append(prev)
    return hashes


class BlockManager:
    """Hands out ids 0..num_blocks-1 of one preallocated KV region; never touches the tensor.

    Free pool = truly free blocks (runs of consecutive ids) + evictable blocks (ref 0 but still
    holding a cached prefix hash, least recently freed first). Every operation costs O(log
    num_blocks) per run it touches plus O(1) per block it hands out or takes back, whatever the
    pool size. Not thread-safe: one engine loop owns it.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        # enable_prefix_caching=False: no hashing, no hits, freed blocks go straight back to the pool
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * num_blocks
        self._hash: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}
        self._free = FreeRuns(num_blocks)
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self.prefix_queries = 0  # in blocks: full prompt blocks eligible for a hit
        self.prefix_hits = 0     # in blocks: those found in the cache

    @property
    def num_free_blocks(self) -> int:
        """Truly free plus evictable cached blocks."""
        return self._free.count + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        """Blocks held by live sequences (ref count > 0)."""
        return self.num_blocks - self.num_free_blocks

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate_n(self, n: int) -> bool:
        return n <= self.num_free_blocks

    def allocate_n(self, n: int) -> list[int]:
        """n fresh blocks with no hashing (the decode side, whose KV arrives from elsewhere)."""
        self._check(n)
        return self._take(n)

    def can_allocate(self, token_ids: Sequence[int], mm_spans: Iterable[MMSpan] = (),
                     read_cache: bool = True) -> bool:
        hits = self._lookup(token_ids, mm_spans, read_cache)
        return self._cost(len(token_ids), hits) <= self.num_free_blocks

    def allocate(self, token_ids: Sequence[int], mm_spans: Iterable[MMSpan] = (),
                 read_cache: bool = True) -> Allocation:
        """Blocks for the whole prompt; leading full blocks come from the prefix cache where they hit
        (read_cache False: none do, for a prompt that needs logits at every position; its blocks
        are still sealed for later prompts). Raises OutOfBlocks, with nothing changed, when the
        pool cannot cover it."""
        hits = self._lookup(token_ids, mm_spans, read_cache)
        # all-or-nothing: the cost is exact, so once this check passes nothing below can fail
        self._check(self._cost(len(token_ids), hits))
        for b in hits:  # claim hits before _take so that eviction cannot pick one of them
            if self._ref[b] == 0:
                del self._evictable[b]
            self._ref[b] += 1
        fresh = self._take(self.blocks_needed(len(token_ids)) - len(hits))
        if self.enable_prefix_caching and read_cache:
            self.prefix_queries += self._eligible(len(token_ids))
            self.prefix_hits += len(hits)
        return Allocation(hits + fresh, len(hits) * self.block_size)

    def can_append(self, block_ids: Sequence[int], num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) <= len(block_ids) or self.num_free_blocks >= 1

    def append_slot(self, block_ids: Sequence[int], num_tokens: int) -> int | None:
        """The id of a new block when a sequence of num_tokens no longer fits block_ids (the caller
        appends it), else None. Prefers block_ids[-1] + 1 so the sequence stays one run."""
        need = self.blocks_needed(num_tokens) - len(block_ids)
        if need <= 0:
            return None
        if need > 1:
            raise ValueError(f"{num_tokens} tokens need {need} more blocks; append_slot grows by one")
        self._check(1)
        nxt = block_ids[-1] + 1 if block_ids else -1
        if self._free.take_id(nxt):
            self._ref[nxt] = 1
            return nxt
        return self._take(1)[0]

    def seal(self, block_ids: Sequence[int], token_ids: Sequence[int],
             mm_spans: Iterable[MMSpan] = ()) -> int:
        """Register the hashes of the full blocks of token_ids, whose K/V are now computed; returns
        how many became cacheable. Call it after the forward pass, never before: a block is only
        shared once its K/V exist."""
        if not self.enable_prefix_caching:
            return 0
        return self.seal_hashes(block_ids, block_hashes(token_ids, mm_spans, self.block_size))

    def seal_hashes(self, block_ids: Sequence[int], hashes: Sequence[bytes]) -> int:
        """seal() with the blocks' chained hashes already known: block_ids[i] holds hashes[i]."""
        if not self.enable_prefix_caching:
            return 0
        added = 0
        for b, h in zip(block_ids, hashes):
            # a duplicate of an already cached block stays unhashed and returns to the pool when freed
            if self._hash[b] is None and h not in self._cached:
                self._hash[b], self._cached[h] = h, b
                added += 1
        return added

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference from each block; at zero a hashed block stays cached as evictable."""
        if any(self._ref[b] == 0 for b in block_ids):
            raise ValueError(f"double free among blocks {list(block_ids)}")
        # tail first: the tail becomes the least recently freed, so it is evicted before the
        # prefix, which more prompts are likely to share
        free = []
        for b in reversed(block_ids):
            self._ref[b] -= 1
            if self._ref[b] > 0:
                continue
            if self._hash[b] is None:
                free.append(b)
            else:
                self._evictable[b] = None
        self._free.add(free)

    def _eligible(self, num_tokens: int) -> int:
        # As in vLLM v1, hits are capped at num_tokens - 1 tokens in whole blocks: the last prompt
        # token must go through the model to give the first output token's logits. So when every
        # full block would hit and the prompt ends on a block boundary, the last block is a miss and
        # is recomputed whole: a hit block may be shared, and writing into it would race its readers.
        return max(num_tokens - 1, 0) // self.block_size

    def _lookup(self, token_ids: Sequence[int], mm_spans: Iterable[MMSpan],
                read_cache: bool = True) -> list[int]:
        if not self.enable_prefix_caching or not read_cache:
            return []
        n = self._eligible(len(token_ids)) * self.block_size
        hits = []
        for h in block_hashes(token_ids[:n], mm_spans, self.block_size):
            if (b := self._cached.get(h)) is None:
                break
            hits.append(b)
        return hits

    def _cost(self, num_tokens: int, hits: list[int]) -> int:
        # blocks this allocation removes from the free pool: fresh ones plus evictable hits
        return self.blocks_needed(num_tokens) - sum(self._ref[b] > 0 for b in hits)

    def _check(self, n: int) -> None:
        if n > self.num_free_blocks:
            raise OutOfBlocks(f"need {n} KV blocks, {self.num_free_blocks} of {self.num_blocks} free")

    def _take(self, n: int) -> list[int]:
        # Policy, so that a KV transfer is few large slices: see FreeRuns.take. Cached blocks are
        # evicted (LRU) only once no truly free block is left.
        ids = self._free.take(min(n, self._free.count))
        while len(ids) < n:
            b, _ = self._evictable.popitem(last=False)
            del self._cached[self._hash[b]]
            self._hash[b] = None
            ids.append(b)
        for b in ids:
            self._ref[b] = 1
        return ids

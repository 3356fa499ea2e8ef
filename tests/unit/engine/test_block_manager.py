"""BlockManager: exact block ids, ref counts, prefix-cache hits, LRU eviction, all-or-nothing."""
import hashlib
import struct

import pytest

from qwenvl_pd.engine.block_manager import Allocation, BlockManager, OutOfBlocks, block_hashes


def refs(bm: BlockManager) -> list[int]:
    return [bm.ref_count(b) for b in range(bm.num_blocks)]


def state(bm: BlockManager) -> tuple:
    return (refs(bm), bm.num_free_blocks, bm.num_used_blocks, bm.prefix_queries, bm.prefix_hits)


# ---- allocation policy -----------------------------------------------------------------------

def test_fresh_allocation_is_one_run_and_usage_counts_it():
    bm = BlockManager(10, 4)
    assert bm.allocate_n(3) == [0, 1, 2]
    assert refs(bm) == [1, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    assert (bm.num_free_blocks, bm.num_used_blocks, bm.usage) == (7, 3, 0.3)


def test_freed_middle_run_is_reused_when_it_fits():
    bm = BlockManager(10, 4)
    a, b, c = bm.allocate_n(3), bm.allocate_n(4), bm.allocate_n(2)
    assert (a, b, c) == ([0, 1, 2], [3, 4, 5, 6], [7, 8])
    bm.free(b)  # free runs: 3..6 and 9
    assert bm.allocate_n(2) == [3, 4]  # lowest run that fits, cut from its start
    assert bm.allocate_n(2) == [5, 6]
    assert bm.allocate_n(1) == [9]


def test_lowest_fitting_run_wins_over_a_longer_later_one():
    bm = BlockManager(12, 4)
    held = [bm.allocate_n(1) for _ in range(12)]
    bm.free(held[2] + held[3] + held[6] + held[7] + held[8] + held[9])  # runs 2..3 and 6..9
    assert bm.allocate_n(2) == [2, 3]


def test_no_run_fits_fills_from_longest_runs_first():
    bm = BlockManager(12, 4)
    held = [bm.allocate_n(1) for _ in range(12)]
    for i in (1, 2, 5, 6, 7, 10, 11):  # runs 1..2, 5..7, 10..11
        bm.free(held[i])
    # longest run 5..7 whole, then the tie 1..2 vs 10..11 goes to the lower id, cut from its start
    assert bm.allocate_n(4) == [5, 6, 7, 1]
    assert bm.allocate_n(1) == [2]
    assert bm.allocate_n(2) == [10, 11]
    assert bm.num_free_blocks == 0


# ---- append_slot -----------------------------------------------------------------------------

def test_append_slot_only_at_block_boundaries():
    bm = BlockManager(8, 4)
    ids = bm.allocate([1, 2, 3]).block_ids
    assert ids == [0]
    assert bm.append_slot(ids, 4) is None  # the 4th token still fits block 0
    new = bm.append_slot(ids, 5)
    assert new == 1
    ids.append(new)
    assert bm.append_slot(ids, 8) is None
    assert bm.append_slot(ids, 9) == 2
    assert refs(bm) == [1, 1, 1, 0, 0, 0, 0, 0]
    with pytest.raises(ValueError):
        bm.append_slot([0], 9)  # two blocks short: not a one-token step


def test_append_slot_prefers_the_next_id_even_if_lower_ones_are_free():
    bm = BlockManager(8, 2)
    x, y = bm.allocate_n(2), bm.allocate_n(2)
    bm.free(x)  # 0, 1 free; 4 right after y
    assert bm.append_slot(y, 5) == 4


def test_append_slot_falls_back_to_the_lowest_free_block():
    bm = BlockManager(8, 2)
    a, b = bm.allocate_n(2), bm.allocate_n(1)
    assert (a, b) == ([0, 1], [2])
    assert bm.append_slot(a, 5) == 3  # 2 is taken
    assert bm.append_slot(b, 3) == 4  # 3 is taken


def test_append_slot_out_of_blocks():
    bm = BlockManager(2, 2)
    ids = bm.allocate_n(2)
    assert bm.can_append(ids, 4) and not bm.can_append(ids, 5)
    with pytest.raises(OutOfBlocks):
        bm.append_slot(ids, 5)
    assert refs(bm) == [1, 1]


# ---- ref counts and free ---------------------------------------------------------------------

def test_free_returns_block_at_zero_refs_and_rejects_double_free():
    bm = BlockManager(4, 2)
    prompt = [1, 2, 3, 4, 5]
    a = bm.allocate(prompt).block_ids
    bm.seal(a, prompt)
    b = bm.allocate(prompt).block_ids
    assert (a, b) == ([0, 1, 2], [0, 1, 3])
    assert refs(bm) == [2, 2, 1, 1]
    assert bm.num_used_blocks == 4  # shared blocks count once
    bm.free(a)
    assert refs(bm) == [1, 1, 0, 1]
    assert (bm.num_free_blocks, bm.usage) == (1, 0.75)
    bm.free(b)
    assert (refs(bm), bm.num_free_blocks, bm.usage) == ([0, 0, 0, 0], 4, 0.0)
    before = state(bm)
    with pytest.raises(ValueError):
        bm.free(b)
    assert state(bm) == before


# ---- prefix caching --------------------------------------------------------------------------

def test_repeated_prompt_hits_full_blocks_only_after_seal():
    bm = BlockManager(10, 4)
    prompt = list(range(100, 110))  # 10 tokens: 2 full blocks + 2 tokens
    first = bm.allocate(prompt)
    assert first == Allocation([0, 1, 2], 0)
    assert bm.allocate(prompt) == Allocation([3, 4, 5], 0)  # not sealed yet: K/V not computed
    assert bm.seal(first.block_ids, prompt) == 2
    assert bm.seal(first.block_ids, prompt) == 0  # idempotent
    third = bm.allocate(prompt)
    assert third == Allocation([0, 1, 6], 8)
    assert refs(bm)[:7] == [2, 2, 1, 1, 1, 1, 1]
    assert (bm.prefix_queries, bm.prefix_hits) == (6, 2)  # in blocks


def test_prompt_on_block_boundary_recomputes_its_last_block():
    bm = BlockManager(8, 4)
    prompt = list(range(8))  # exactly 2 full blocks
    a = bm.allocate(prompt).block_ids
    assert bm.seal(a, prompt) == 2
    b = bm.allocate(prompt)
    assert b == Allocation([0, 2], 4)  # block 1 would hit, but the last token must be recomputed
    assert (bm.prefix_queries, bm.prefix_hits) == (2, 1)
    assert bm.seal(b.block_ids, prompt) == 0  # block 2 duplicates block 1: stays unhashed
    bm.free(b.block_ids)
    assert refs(bm)[:3] == [1, 1, 0]
    assert bm.allocate_n(1) == [2]  # it went back as a truly free block, not a cached one
    longer = bm.allocate(prompt + [99])
    assert longer == Allocation([0, 1, 3], 8)  # one more token: both blocks are eligible


def test_same_text_other_image_misses_from_the_image_block():
    bm = BlockManager(16, 4)
    pad, vs, ve = 7, 5, 6
    # block 0: text; blocks 1-2 hold the image's pads (tokens 6..13); block 3: text; token 16 partial
    tokens = [1, 2, 3, 4, 9, vs] + [pad] * 8 + [ve, 8, 9]
    assert len(tokens) == 17
    img_a, img_b = [(6, 14, "sha256:aaaa")], [(6, 14, b"\xbb" * 32)]
    a = bm.allocate(tokens, img_a).block_ids
    assert bm.seal(a, tokens, img_a) == 4
    same = bm.allocate(tokens, img_a)
    assert same.num_cached_tokens == 16 and same.block_ids[:4] == a[:4]
    other = bm.allocate(tokens, img_b)
    assert other.num_cached_tokens == 4  # block 0 hits; block 1 holds the other image's pads
    assert other.block_ids[0] == a[0] and not set(other.block_ids[1:]) & set(a)
    assert bm.can_allocate(tokens, img_a) and bm.prefix_hits == 5


def test_block_hash_is_stable_and_sees_items_and_their_offsets():
    plain = block_hashes([1, 2, 3, 4], [], 4)
    assert plain[0].hex().startswith("73e200e2b048c86d")  # not Python's per-process hash()
    assert plain[0] == hashlib.sha256(struct.pack("<4q", 1, 2, 3, 4)).digest()
    img = block_hashes([1, 2, 3, 4], [(2, 6, "img")], 4)[0]
    assert img.hex().startswith("17d06be3931158bf")
    assert block_hashes([1, 2, 3, 4], [(2, 6, b"img")], 4)[0] == img  # str and bytes agree
    assert block_hashes([1, 2, 3, 4], [(1, 6, "img")], 4)[0] != img  # same image, shifted
    assert block_hashes([1, 2, 3, 4], [(4, 6, "img")], 4)[0] == plain[0]  # span outside the block
    assert len(block_hashes(list(range(11)), [], 4)) == 2  # partial block never hashed
    chained = block_hashes([0, 0, 0, 0, 1, 2, 3, 4], [], 4)
    assert chained[1] != plain[0]  # the same tokens after another prefix


def test_can_allocate_counts_live_hits_as_free():
    bm = BlockManager(4, 2)
    prompt = [1, 2, 3, 4, 5]
    a = bm.allocate(prompt).block_ids
    bm.seal(a, prompt)
    assert bm.num_free_blocks == 1
    assert bm.can_allocate(prompt)  # blocks 0, 1 are shared: only one new block
    assert not bm.can_allocate([9, 9, 9, 9, 9])
    assert not bm.can_allocate_n(2) and bm.can_allocate_n(1)
    assert bm.allocate(prompt) == Allocation([0, 1, 3], 4)


def test_prefix_caching_disabled_never_hits():
    bm = BlockManager(6, 2, enable_prefix_caching=False)
    prompt = [1, 2, 3, 4, 5]
    a = bm.allocate(prompt).block_ids
    assert bm.seal(a, prompt) == 0
    bm.free(a)
    assert bm.allocate(prompt) == Allocation([0, 1, 2], 0)
    assert (bm.prefix_queries, bm.prefix_hits) == (0, 0)


# ---- eviction --------------------------------------------------------------------------------

def test_cached_blocks_stay_evictable_and_are_evicted_least_recently_freed_first():
    bm = BlockManager(4, 2)
    p, q = [1, 2, 3, 4], [5, 6, 7, 8]
    a, b = bm.allocate(p).block_ids, bm.allocate(q).block_ids
    assert (a, b) == ([0, 1], [2, 3])
    assert bm.seal(a, p) == bm.seal(b, q) == 2
    bm.free(b)  # tail first: 3 then 2
    bm.free(a)  # 1 then 0
    assert (bm.num_free_blocks, bm.num_used_blocks, bm.usage) == (4, 0, 0.0)
    x, y = bm.allocate_n(1), bm.allocate_n(1)
    assert (x, y) == ([3], [2])
    # p hits evictable block 0 (its last block is capped); the fresh block evicts 1, dropping its hash
    again = bm.allocate(p)
    assert again == Allocation([0, 1], 2)
    assert refs(bm) == [1, 1, 1, 1]
    assert bm.seal(again.block_ids, p) == 1  # block 1 is registered anew
    bm.free(again.block_ids + x + y)
    assert bm.allocate([1, 2, 3, 4, 0]) == Allocation([0, 1, 2], 4)  # q's blocks are gone


def test_eviction_only_after_truly_free_blocks_run_out():
    bm = BlockManager(4, 2)
    p = [1, 2, 3]
    a = bm.allocate(p).block_ids
    assert a == [0, 1]
    bm.seal(a, p)
    bm.free(a)  # 1 back to the pool (partial, unhashed), 0 evictable
    held = bm.allocate_n(3)
    assert held == [1, 2, 3]  # the pool was used before the cached block 0
    bm.free([held[2]])
    assert bm.allocate(p) == Allocation([0, 3], 2)  # block 0 still hits
    assert bm.num_free_blocks == 0


# ---- all-or-nothing --------------------------------------------------------------------------

def test_out_of_blocks_leaves_state_unchanged():
    bm = BlockManager(6, 2)
    p = [1, 2, 3, 4, 5]
    a = bm.allocate(p).block_ids
    bm.seal(a, p)
    bm.free(a)  # 0, 1 evictable; 2..5 truly free
    held = bm.allocate_n(3)
    assert held == [2, 3, 4]
    before = state(bm)
    with pytest.raises(OutOfBlocks):
        bm.allocate_n(4)
    with pytest.raises(OutOfBlocks):
        bm.allocate([1, 2, 3, 4, 5, 6, 7, 8, 9])  # would hit 0, 1 and still need 3 more
    assert not bm.can_allocate([1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert state(bm) == before
    # the cached prefix survived the failed attempts, and the next fresh block is still 5
    assert bm.allocate(p) == Allocation([0, 1, 5], 4)


# ---- contiguous runs after fragmentation -----------------------------------------------------

def _fragment(bm: BlockManager, keep: set[int]) -> list[list[int]]:
    """Allocate every block one by one, then free all but `keep`: the free pool becomes the gaps."""
    held = [bm.allocate_n(1) for _ in range(bm.num_blocks)]
    for b in range(bm.num_blocks):
        if b not in keep:
            bm.free(held[b])
    return held


def test_after_fragmentation_a_prompt_gets_the_lowest_gap_that_holds_it_whole():
    bm = BlockManager(32, 4)
    _fragment(bm, keep={0, 3, 9, 10, 20})  # gaps 1..2, 4..8, 11..19, 21..31
    assert bm.allocate(list(range(17))).block_ids == [4, 5, 6, 7, 8]  # 5 blocks: the first fit
    assert bm.allocate(list(range(30))).block_ids == [11, 12, 13, 14, 15, 16, 17, 18]
    assert bm.allocate_n(2) == [1, 2]
    assert bm.allocate_n(4) == [21, 22, 23, 24]  # 19 alone is too short
    # gaps 19 and 25..31 left: no gap holds 8, so the longest goes whole, then the next longest
    assert bm.allocate_n(8) == [25, 26, 27, 28, 29, 30, 31, 19]
    assert bm.num_free_blocks == 0


def test_freed_neighbours_merge_into_one_run_for_the_next_allocation():
    bm = BlockManager(12, 2)
    held = _fragment(bm, keep=set(range(12)))
    for b in (5, 3, 4, 7, 6):  # freed out of order, one at a time
        bm.free(held[b])
    assert bm.allocate_n(5) == [3, 4, 5, 6, 7]


def test_sequences_growing_side_by_side_stay_one_run_each_when_room_allows():
    bm = BlockManager(64, 4)
    a = bm.allocate(list(range(8))).block_ids  # [0, 1]
    bm.allocate_n(2)                            # [2, 3] sits right after a
    b = bm.allocate(list(range(7))).block_ids   # [4, 5]
    assert bm.append_slot(b, 9) == 6            # b's next id is free
    b.append(6)
    assert bm.append_slot(a, 9) == 7            # a's next id (2) is held: the lowest free block
    a.append(7)
    assert (a, b) == ([0, 1, 7], [4, 5, 6])


def test_a_large_pool_after_fragmentation():
    n = 1 << 17
    bm = BlockManager(n, 16)
    bm.allocate_n(n)
    bm.free(list(range(1000, 1003)) + list(range(50000, 50100)) + list(range(n - 10, n)))
    assert bm.num_free_blocks == 113
    assert bm.allocate_n(10) == list(range(50000, 50010))
    assert bm.allocate_n(3) == [1000, 1001, 1002]
    assert bm.allocate_n(100) == list(range(50010, 50100)) + list(range(n - 10, n))
    assert bm.num_free_blocks == 0


def _salted(salt: str, tokens: list[int]):
    import torch
    from qwenvl_pd.engine.sequence import Sequence
    from qwenvl_pd.sampling_params import SamplingParams
    return Sequence("r", tokens, torch.zeros(3, len(tokens), dtype=torch.long), 0, SamplingParams(max_tokens=1),
                    cache_salt=salt)


def test_a_cache_salt_hits_only_its_own_prefix():
    bm, tokens = BlockManager(16, 4), list(range(10))
    a = _salted("tenant-a", tokens)
    assert a.mm_spans == [(0, 1, "cache_salt:tenant-a")]
    first = bm.allocate(tokens, a.mm_spans)
    assert bm.seal(first.block_ids, tokens, a.mm_spans) == 2
    assert bm.allocate(tokens, _salted("tenant-b", tokens).mm_spans).num_cached_tokens == 0
    assert bm.allocate(tokens).num_cached_tokens == 0  # nor a request without a salt
    again = bm.allocate(tokens, _salted("tenant-a", tokens).mm_spans)
    assert (again.num_cached_tokens, again.block_ids[:2]) == (8, first.block_ids[:2])

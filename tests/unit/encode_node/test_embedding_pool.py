import pytest

from qwenvl_pd.kv_transfer.arena import ByteArena
from qwenvl_pd.encode_node.pool import EmbeddingPool, PoolError


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def _put(pool: EmbeddingPool, key: str, nbytes: int, leases=()) -> int:
    entry = pool.reserve(key, nbytes, num_tokens=1)
    pool.publish(key, list(leases))
    return entry.offset


def test_arena_first_fit_aligned_and_coalescing():
    arena = ByteArena(1000, align=64)  # 960 usable
    assert arena.capacity == 960
    assert [arena.allocate(n) for n in (1, 64, 65, 200)] == [0, 64, 128, 256]
    arena.free(64, 64)
    assert arena.allocate(10) == 64  # the first hole that fits
    arena.free(128, 65)
    arena.free(64, 10)
    assert arena.allocate(192) == 64  # [64, 256) merged into one hole
    assert arena.free_bytes == 960 - 64 - 192 - 256
    with pytest.raises(ValueError, match="already free"):
        arena.free(512, 64)


def test_entries_placed_at_exact_offsets():
    pool = EmbeddingPool(1024, align=64)
    assert [_put(pool, k, n) for k, n in (("a", 100), ("b", 64), ("c", 1))] == [0, 128, 192]
    assert pool.bytes_used() == 256


def test_least_recently_used_goes_first():
    pool = EmbeddingPool(256, align=64)
    for key in "abcd":
        _put(pool, key, 64)
    pool.release([pool.lease_if_ready("a", 30)[1].lease_id])  # a is now the most recent
    assert _put(pool, "e", 64) == 64  # b's place
    assert pool.keys() == ["c", "d", "a", "e"]
    assert _put(pool, "f", 128) == 128  # c and d were adjacent
    assert pool.keys() == ["a", "e", "f"]


def test_pinned_entries_are_never_evicted():
    pool = EmbeddingPool(192, align=64)
    _put(pool, "a", 64, leases=[30])
    _put(pool, "b", 64)
    _put(pool, "c", 64, leases=[30])
    assert _put(pool, "d", 64) == 64  # b was the only unpinned one
    assert pool.keys() == ["a", "c", "d"]
    assert pool.pinned() == 2


def test_pool_full_of_pinned_entries_refuses():
    pool = EmbeddingPool(128, align=64)
    _put(pool, "a", 64, leases=[30])
    pool.reserve("b", 64, 1)  # being written: not evictable either
    with pytest.raises(PoolError, match="pool full: 64 bytes wanted"):
        pool.reserve("c", 64, 1)


def test_too_large_entry_is_refused_clearly():
    pool = EmbeddingPool(1024, align=64)
    _put(pool, "a", 64)
    with pytest.raises(PoolError, match="needs 1025 bytes, more than the whole pool \\(1024 bytes"):
        pool.reserve("big", 1025, 1)
    assert pool.keys() == ["a"]  # nothing evicted for it


def test_unready_entry_is_not_a_hit():
    pool = EmbeddingPool(1024)
    pool.reserve("a", 64, 1)
    assert pool.lease_if_ready("a", 30) is None
    pool.drop("a")
    assert pool.bytes_used() == 0


def test_leases_expire_and_release_once():
    clock = Clock(1000.0)
    pool = EmbeddingPool(1024, clock=clock)
    pool.reserve("a", 64, 1)
    first, second = pool.publish("a", [10, 30])
    assert (first.expires_unix_ms, second.expires_unix_ms) == (1_010_000, 1_030_000)
    clock.now = 1010.0
    assert pool.expire() == 1
    assert pool.release([first.lease_id, second.lease_id]) == 1  # the first had expired
    assert pool.release([second.lease_id]) == 0
    assert pool.pinned() == 0

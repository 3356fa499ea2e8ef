"""KV slice arithmetic: exact addresses, coalescing, splitting, validation, fingerprints."""
import ctypes
import random

import pytest
import torch

from qwenvl_pd.kv_transfer.handle import KVHandle, LayoutFingerprint
from qwenvl_pd.kv_transfer.layout import (Region, block_runs, fingerprint_for, merge_adjacent,
                                          read_slices)

L, R = 0x200000, 0x100000
# 2 layers, 64-byte blocks; local region 8 blocks (plane stride 512 B), remote 10 (stride 640 B)
LOCAL = Region(base=L, num_layers=2, num_blocks=8, block_bytes=64)
REMOTE = Region(base=R, num_layers=2, num_blocks=10, block_bytes=64)


def test_one_run_is_one_slice_per_layer_and_plane():
    assert read_slices(LOCAL, REMOTE, [2, 3, 4], [5, 6, 7]) == [
        (L + 320, R + 128, 192),                 # layer 0 K
        (L + 512 + 320, R + 640 + 128, 192),     # layer 0 V
        (L + 1024 + 320, R + 1280 + 128, 192),   # layer 1 K
        (L + 1536 + 320, R + 1920 + 128, 192),   # layer 1 V
    ]


def test_a_remote_gap_splits_the_run():
    assert read_slices(LOCAL, REMOTE, [2, 3, 5], [0, 1, 2]) == [
        (L + 0, R + 128, 128), (L + 128, R + 320, 64),
        (L + 512, R + 640 + 128, 128), (L + 512 + 128, R + 640 + 320, 64),
        (L + 1024, R + 1280 + 128, 128), (L + 1024 + 128, R + 1280 + 320, 64),
        (L + 1536, R + 1920 + 128, 128), (L + 1536 + 128, R + 1920 + 320, 64),
    ]


def test_local_non_contiguity_splits_the_run():
    slices = read_slices(LOCAL, REMOTE, [2, 3, 4], [0, 1, 3])
    assert slices[:2] == [(L + 0, R + 128, 128), (L + 192, R + 256, 64)]
    assert len(slices) == 8


def test_reversed_ids_never_coalesce_and_keep_token_order():
    assert block_runs([4, 3, 2], [0, 1, 2]) == [(4, 0, 1), (3, 1, 1), (2, 2, 1)]
    assert read_slices(LOCAL, REMOTE, [4, 3, 2], [0, 1, 2])[:3] == [
        (L + 0, R + 256, 64), (L + 64, R + 192, 64), (L + 128, R + 128, 64)]


def test_lengths_are_exactly_the_blocks_moved():
    slices = read_slices(LOCAL, REMOTE, [9, 0, 1, 2, 7], [7, 1, 2, 3, 0])
    assert sum(n for _, _, n in slices) == 5 * 2 * 2 * 64
    assert len(slices) == 2 * 2 * 3  # runs: [9->7], [0,1,2->1,2,3], [7->0]


def test_whole_regions_of_equal_size_merge_into_one_slice():
    a = Region(base=L, num_layers=3, num_blocks=4, block_bytes=32)
    b = Region(base=R, num_layers=3, num_blocks=4, block_bytes=32)
    assert read_slices(a, b, [0, 1, 2, 3], [0, 1, 2, 3]) == [(L, R, 3 * 2 * 4 * 32)]
    assert merge_adjacent([(0, 10, 4), (4, 14, 2), (6, 20, 1)]) == [(0, 10, 6), (6, 20, 1)]


def test_empty_request_is_no_slices():
    assert read_slices(LOCAL, REMOTE, [], []) == []


@pytest.mark.parametrize("remote_ids, local_ids, match", [
    ([1, 2], [1], "2 remote blocks but 1 local"),
    ([10], [0], r"remote block ids \[10\] outside a region of 10"),
    ([0], [-1], r"local block ids \[-1\] outside a region of 8"),
    ([0, 1], [3, 3], "local block ids repeat"),
])
def test_bad_block_ids_are_refused(remote_ids, local_ids, match):
    with pytest.raises(ValueError, match=match):
        read_slices(LOCAL, REMOTE, remote_ids, local_ids)


def test_regions_of_different_layouts_are_refused():
    with pytest.raises(ValueError, match="regions disagree"):
        read_slices(LOCAL, Region(base=R, num_layers=3, num_blocks=10, block_bytes=64), [0], [0])
    with pytest.raises(ValueError, match="regions disagree"):
        read_slices(LOCAL, Region(base=R, num_layers=2, num_blocks=10, block_bytes=128), [0], [0])


def test_slices_applied_as_raw_copies_equal_block_indexing():
    """memmove each slice between two real tensors: the result must equal tensor indexing."""
    rng = random.Random(0)
    remote = torch.randn(3, 2, 11, 4, 2, 8)
    local = torch.zeros(3, 2, 7, 4, 2, 8)
    remote_ids = rng.sample(range(11), 5) + [3, 4]
    remote_ids = list(dict.fromkeys(remote_ids))
    local_ids = rng.sample(range(7), len(remote_ids))
    for loc, rem, n in read_slices(Region.from_tensor(local), Region.from_tensor(remote),
                                   remote_ids, local_ids):
        ctypes.memmove(loc, rem, n)
    assert torch.equal(local[:, :, local_ids], remote[:, :, remote_ids])
    untouched = [b for b in range(7) if b not in local_ids]
    assert local[:, :, untouched].abs().sum().item() == 0


def test_region_from_shape_tensor_and_handle_agree():
    kv = torch.zeros(2, 2, 5, 4, 16, 8, dtype=torch.bfloat16)  # 4 heads of 16 tokens x 8
    r = Region.from_tensor(kv)
    assert r == Region.from_shape(kv.data_ptr(), kv.shape, 2)
    assert (r.num_layers, r.num_blocks, r.block_bytes, r.nbytes) == (2, 5, 16 * 4 * 8 * 2, kv.nbytes)
    assert (r.kv_heads, r.head_bytes) == (4, 16 * 8 * 2)
    assert r.address(1, 1, 4) - r.base == kv[1, 1, 4].data_ptr() - kv.data_ptr()
    fp = fingerprint_for("m", torch.bfloat16, 16, 2, 4, 8)
    handle = KVHandle("p0", "h:1", r.base, r.block_bytes, 5, (3, 4), 20, fp)
    assert Region.from_handle(handle) == r
    assert handle.block_address(1, 0, 3) == r.address(1, 0, 3)
    with pytest.raises(ValueError, match="contiguous"):
        Region.from_tensor(kv.transpose(0, 2))
    with pytest.raises(ValueError, match="shape"):
        Region.from_shape(r.base, (2, 3, 5, 16, 4, 8), 2)


def test_fingerprint_for_normalises_dtype_and_checks_ranks():
    fp = fingerprint_for("Qwen/Qwen2.5-VL-7B-Instruct", torch.bfloat16, 16, 28, 4, 128, tp_size=2,
                         tp_rank=1)
    assert fp == LayoutFingerprint("Qwen/Qwen2.5-VL-7B-Instruct", "bfloat16", 16, 28, 4, 128, 2, 1)
    assert fingerprint_for("m", "float32", 16, 1, 1, 1).dtype == "float32"
    assert fingerprint_for("m", "torch.float16", 16, 1, 1, 1).dtype == "float16"
    other = fingerprint_for("Qwen/Qwen2.5-VL-7B-Instruct", "bfloat16", 32, 28, 4, 128, 2, 1)
    assert fp.mismatch(other) == "block_size: prefill 16, decode 32"
    with pytest.raises(ValueError, match="tp_rank 2 outside tp_size 2"):
        fingerprint_for("m", "float32", 16, 1, 1, 1, tp_size=2, tp_rank=2)
    with pytest.raises(ValueError, match="block_size must be positive"):
        fingerprint_for("m", "float32", 0, 1, 1, 1)


def test_a_layer_range_reads_only_those_layers_planes():
    # 3 layers, 64-byte blocks: each plane of a layer is num_blocks * 64 B on from the last
    local = Region(base=L, num_layers=3, num_blocks=8, block_bytes=64)
    remote = Region(base=R, num_layers=3, num_blocks=10, block_bytes=64)
    assert read_slices(local, remote, [2, 3], [5, 6], layers=range(1, 3)) == [
        (L + 1024 + 320, R + 1280 + 128, 128),   # layer 1 K
        (L + 1536 + 320, R + 1920 + 128, 128),   # layer 1 V
        (L + 2048 + 320, R + 2560 + 128, 128),   # layer 2 K
        (L + 2560 + 320, R + 3200 + 128, 128),   # layer 2 V
    ]
    assert read_slices(local, remote, [4], [0], layers=range(0, 1)) == [
        (L + 0, R + 256, 64), (L + 512, R + 640 + 256, 64)]


def test_a_layer_range_outside_the_region_is_refused():
    for bad in (range(1, 3), range(1, 1), range(-1, 1), range(0, 2, 2)):
        with pytest.raises(ValueError, match="outside a region of 2 layers"):
            read_slices(LOCAL, REMOTE, [2], [5], layers=bad)

"""Heterogeneous TP: which prefill ranks a decode rank reads its KV heads from, at exact offsets."""
import ctypes

import pytest
import torch

from qwenvl_pd.kv_transfer.handle import KVHandle, KVSegment
from qwenvl_pd.kv_transfer.heads import HeadPiece, handle_problem, head_pieces, heads_per_rank, pull_plan
from qwenvl_pd.kv_transfer.layout import Region, fingerprint_for
from qwenvl_pd.model.parallel import TensorParallel

L = 0x100000                       # the decode rank's region
R = [0x200000, 0x300000, 0x400000, 0x500000]  # prefill rank r's region
HEAD = 16                          # bytes of one head of one block (block_size 2 x head_dim 4 x 2 B)
BLOCKS = 4                         # per region: one layer's K plane is BLOCKS blocks, then V


def _plan(num_kv_heads: int, prefill_tp: int, decode_tp: int, decode_rank: int) -> dict:
    """Remote blocks [1, 2] -> local blocks [0, 1] of a 1-layer model."""
    local_heads, remote_heads = heads_per_rank(num_kv_heads, decode_tp), heads_per_rank(num_kv_heads, prefill_tp)
    local = Region(L, 1, BLOCKS, local_heads * HEAD, local_heads)
    remotes = [Region(R[r], 1, BLOCKS, remote_heads * HEAD, remote_heads) for r in range(prefill_tp)]
    pieces = head_pieces(num_kv_heads, prefill_tp, decode_tp, decode_rank)
    return pull_plan(local, remotes, pieces, [1, 2], [0, 1])


def test_p2_to_d1_reads_each_prefill_ranks_head_into_its_place_in_every_block():
    assert head_pieces(2, 2, 1, 0) == [HeadPiece(0, 0, 0, 1), HeadPiece(1, 1, 0, 1)]
    # local blocks are 32 B (2 heads), K plane 128 B; remote blocks 16 B, K plane 64 B
    assert _plan(2, 2, 1, 0) == {
        0: [(L + 0, R[0] + 16, 16), (L + 32, R[0] + 32, 16),               # K, blocks 1, 2 -> 0, 1
            (L + 128, R[0] + 64 + 16, 16), (L + 128 + 32, R[0] + 64 + 32, 16)],  # V
        1: [(L + 16, R[1] + 16, 16), (L + 48, R[1] + 32, 16),
            (L + 128 + 16, R[1] + 64 + 16, 16), (L + 128 + 48, R[1] + 64 + 32, 16)],
    }


@pytest.mark.parametrize("rank", [0, 1])
def test_p1_to_d2_reads_the_ranks_half_of_each_prefill_block(rank):
    assert head_pieces(2, 1, 2, rank) == [HeadPiece(0, 0, rank, 1)]
    # remote blocks are 32 B (2 heads), K plane 128 B; local blocks 16 B, K plane 64 B
    off = rank * HEAD
    assert _plan(2, 1, 2, rank) == {0: [
        (L + 0, R[0] + 32 + off, 16), (L + 16, R[0] + 64 + off, 16),
        (L + 64, R[0] + 128 + 32 + off, 16), (L + 64 + 16, R[0] + 128 + 64 + off, 16)]}


@pytest.mark.parametrize("rank", [0, 1])
def test_p2_to_d2_reads_whole_blocks_from_the_same_rank_one_slice_a_plane(rank):
    assert head_pieces(2, 2, 2, rank) == [HeadPiece(rank, 0, 0, 1)]
    assert _plan(2, 2, 2, rank) == {rank: [(L, R[rank] + 16, 32), (L + 64, R[rank] + 64 + 16, 32)]}
    assert head_pieces(4, 2, 2, rank) == [HeadPiece(rank, 0, 0, 2)]


@pytest.mark.parametrize("rank", [0, 1])
def test_one_kv_head_p1_to_d2_both_ranks_read_the_whole_head(rank):
    assert head_pieces(1, 1, 2, rank) == [HeadPiece(0, 0, 0, 1)]
    assert _plan(1, 1, 2, rank) == {0: [(L, R[0] + 16, 32), (L + 64, R[0] + 64 + 16, 32)]}


def test_one_kv_head_p2_to_d1_reads_the_replica_of_the_lowest_rank_only():
    assert head_pieces(1, 2, 1, 0) == [HeadPiece(0, 0, 0, 1)]
    assert _plan(1, 2, 1, 0) == {0: [(L, R[0] + 16, 32), (L + 64, R[0] + 64 + 16, 32)]}


def test_replicas_on_both_sides_and_uneven_overlaps():
    # 2 heads, P4: ranks 0, 1 hold head 0 and 2, 3 head 1; D2 rank 1 (head 1) reads rank 2
    assert head_pieces(2, 4, 2, 1) == [HeadPiece(2, 0, 0, 1)]
    # 2 heads, P2 -> D4: ranks 2, 3 both hold head 1, prefill rank 1's only head
    assert [head_pieces(2, 2, 4, r) for r in (1, 2)] == [[HeadPiece(0, 0, 0, 1)], [HeadPiece(1, 0, 0, 1)]]
    # 4 heads, P1 -> D2 rank 1: heads 2, 3 are one piece, the upper half of each block
    assert head_pieces(4, 1, 2, 1) == [HeadPiece(0, 0, 2, 2)]
    # 6 heads, P2 (3 each) -> D3 rank 1 (heads 2, 3): one head from each prefill rank
    assert head_pieces(6, 2, 3, 1) == [HeadPiece(0, 0, 2, 1), HeadPiece(1, 1, 0, 1)]


def test_head_slices_refuse_regions_whose_heads_differ_in_size():
    local, remote = Region(L, 1, BLOCKS, 16, 1), Region(R[0], 1, BLOCKS, 64, 2)  # 16 B vs 32 B heads
    with pytest.raises(ValueError, match="local 16 B heads, remote 32 B heads"):
        pull_plan(local, [remote], [HeadPiece(0, 0, 1, 1)], [1], [0])


def test_fingerprints_of_different_tp_sizes_map_unless_a_split_is_invalid():
    p2, d1 = fingerprint_for("m", "bfloat16", 16, 2, 2, 8, tp_size=2), fingerprint_for("m", "bfloat16", 16, 2, 2, 8)
    assert p2.mismatch(d1) is None and d1.mismatch(p2, names=("decode", "prefill")) is None
    p3 = fingerprint_for("m", "bfloat16", 16, 2, 2, 8, tp_size=3, tp_rank=1)
    assert p3.mismatch(d1) == "tp_size: prefill 3 cannot split 2 KV heads (neither divides the other)"
    d1_4 = fingerprint_for("m", "bfloat16", 16, 2, 4, 8)
    assert p2.mismatch(d1_4) == "num_kv_heads: prefill 2, decode 4"
    assert (p2.heads_per_rank, d1.heads_per_rank, p3.heads_per_rank) == (1, 2, 1)


def test_a_handle_whose_blocks_are_not_its_ranks_heads_is_named():
    fp = fingerprint_for("m", "bfloat16", 2, 1, 2, 4, tp_size=2)  # 1 head of 16 B a rank
    handle = KVHandle("p0", "h:1", R[0], 16, BLOCKS, (1, 2), 3, fp, rank_segments=(KVSegment("h:2", R[1]),))
    assert handle_problem(handle, Region(L, 1, BLOCKS, 32, 2)) is None
    assert Region.from_handle(handle, 1) == Region(R[1], 1, BLOCKS, 16, 1)
    wrong = KVHandle("p0", "h:1", R[0], 32, BLOCKS, (1, 2), 3, fp, rank_segments=(KVSegment("h:2", R[1]),))
    assert handle_problem(wrong, Region(L, 1, BLOCKS, 32, 2)) == (
        "block_bytes: prefill 32 B blocks of 1 heads, decode expects 16 B (16 B a head)")


@pytest.mark.parametrize("num_kv_heads, prefill_tp, decode_tp", [(2, 2, 1), (2, 1, 2), (4, 2, 4), (1, 2, 1),
                                                                 (1, 1, 2), (6, 2, 3)])
def test_plans_applied_as_raw_copies_give_each_decode_rank_exactly_its_heads(num_kv_heads, prefill_tp,
                                                                              decode_tp):
    """memmove every slice between real [layers, 2, blocks, heads, block_size, d] tensors."""
    torch.manual_seed(0)
    full = torch.randn(3, 2, 9, num_kv_heads, 4, 8)  # the model's KV, every head
    shard = [TensorParallel(r, prefill_tp).kv_heads(num_kv_heads) for r in range(prefill_tp)]
    prefill = [full[:, :, :, f:f + n].contiguous() for f, n in shard]
    remote_ids, local_ids = [7, 8, 2, 3], [0, 1, 5, 4]
    for rank in range(decode_tp):
        first, count = TensorParallel(rank, decode_tp).kv_heads(num_kv_heads)
        local = torch.zeros(3, 2, 6, count, 4, 8)
        pieces = head_pieces(num_kv_heads, prefill_tp, decode_tp, rank)
        plan = pull_plan(Region.from_tensor(local), [Region.from_tensor(t) for t in prefill], pieces,
                         remote_ids, local_ids)
        for slices in plan.values():
            for loc, rem, n in slices:
                ctypes.memmove(loc, rem, n)
        assert torch.equal(local[:, :, local_ids], full[:, :, remote_ids, first:first + count])
        assert local[:, :, [2, 3]].abs().sum().item() == 0  # blocks not read stay untouched


def test_a_layer_range_with_head_pieces_reads_those_layers_of_each_prefill_rank():
    # p2 -> d1 over a 2-layer region: only layer 1, remote block 3 -> local block 2
    local = Region(L, 2, BLOCKS, 2 * HEAD, 2)
    remotes = [Region(R[r], 2, BLOCKS, HEAD, 1) for r in range(2)]
    plan = pull_plan(local, remotes, head_pieces(2, 2, 1, 0), [3], [2], layers=range(1, 2))
    # local planes are 128 B (4 blocks x 32 B), remote 64 B; layer 1 K is plane 2, V plane 3
    assert plan == {0: [(L + 256 + 64, R[0] + 128 + 48, 16), (L + 384 + 64, R[0] + 192 + 48, 16)],
                    1: [(L + 256 + 80, R[1] + 128 + 48, 16), (L + 384 + 80, R[1] + 192 + 48, 16)]}

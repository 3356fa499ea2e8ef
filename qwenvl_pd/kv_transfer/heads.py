"""Which prefill ranks hold the KV heads a decode rank owns, and the reads that fetch them.

Both sides split the KV heads the way their attention does (model.parallel.TensorParallel.kv_heads):
an even share each when tp <= kv heads, else every head replicated on tp / kv_heads ranks. A
decode rank's heads [h0, h0 + n) therefore lie on one or more prefill ranks; a replicated head is
read from the lowest prefill rank holding it. Pure arithmetic: nothing here touches Mooncake.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from qwenvl_pd.kv_transfer.handle import KVHandle
from qwenvl_pd.kv_transfer.layout import Region, Slice, read_head_slices
from qwenvl_pd.model.parallel import TensorParallel


@dataclass(frozen=True)
class HeadPiece:
    """Consecutive heads a decode rank reads from one prefill rank."""
    prefill_rank: int
    local_head: int   # first head in the decode rank's region
    remote_head: int  # first head in the prefill rank's region
    count: int


def head_pieces(num_kv_heads: int, prefill_tp: int, decode_tp: int, decode_rank: int) -> list[HeadPiece]:
    """The heads decode rank `decode_rank` owns, as pieces in local head order."""
    first, count = TensorParallel(decode_rank, decode_tp).kv_heads(num_kv_heads)
    holders = [TensorParallel(r, prefill_tp).kv_heads(num_kv_heads) for r in range(prefill_tp)]
    pieces: list[HeadPiece] = []
    for local, head in enumerate(range(first, first + count)):
        rank = next(r for r, (f, n) in enumerate(holders) if f <= head < f + n)
        remote = head - holders[rank][0]
        last = pieces[-1] if pieces else None
        if last and last.prefill_rank == rank and last.remote_head + last.count == remote:
            pieces[-1] = HeadPiece(rank, last.local_head, last.remote_head, last.count + 1)
        else:
            pieces.append(HeadPiece(rank, local, remote, 1))
    return pieces


def heads_per_rank(num_kv_heads: int, tp_size: int) -> int:
    """The KV heads in each rank's region at tp_size."""
    return TensorParallel(0, tp_size).kv_heads(num_kv_heads)[1]


def pull_plan(local: Region, remotes: Sequence[Region], pieces: Sequence[HeadPiece],
              remote_blocks: Sequence[int], local_blocks: Sequence[int],
              layers: range | None = None) -> dict[int, list[Slice]]:
    """prefill rank -> the slices to read from it (one batched read each); remotes[r] is prefill
    rank r's region; `layers` restricts the read to a layer range (default: all)."""
    plan: dict[int, list[Slice]] = {}
    for p in pieces:
        heads = (p.local_head, p.remote_head, p.count)
        plan.setdefault(p.prefill_rank, []).extend(
            read_head_slices(local, remotes[p.prefill_rank], remote_blocks, local_blocks, heads, layers))
    return plan


def handle_problem(handle: KVHandle, local: Region) -> str | None:
    """Why decode, whose own region is `local`, cannot read this handle's blocks, or None: each
    prefill rank's blocks must be heads_per_rank heads of decode's head size."""
    fp = handle.fingerprint
    expected = fp.heads_per_rank * local.head_bytes
    if handle.block_bytes != expected:
        return (f"block_bytes: prefill {handle.block_bytes} B blocks of {fp.heads_per_rank} heads, "
                f"decode expects {expected} B ({local.head_bytes} B a head)")
    return None

"""Pure address arithmetic for moving KV blocks between two registered regions.

A region is one tensor [layers, 2 (K/V), num_blocks, kv_heads, block_size, head_dim], so block
`b` of (layer, plane) lives at base + ((layer * 2 + plane) * num_blocks + b) * block_bytes and
head `h` of it head_bytes * h further on. The same block id in different layers is therefore far
apart, and one request's KV is 2 * layers separate pieces even when its block ids are one run: a
read is a list of slices, and the fewer the slices the closer the transfer gets to raw link
bandwidth. A read of only some heads of each block (decode at another TP size) is one slice per
block: heads above tokens keep a head range of a block contiguous.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from qwenvl_pd.kv_transfer.handle import KVHandle, LayoutFingerprint

Slice = tuple[int, int, int]  # (local_addr, remote_addr, length): what Mooncake's batch API takes


@dataclass(frozen=True)
class Region:
    """Where one instance's KV region lives and how it is cut into blocks."""
    base: int
    num_layers: int
    num_blocks: int
    block_bytes: int  # one block of one (layer, K|V) plane
    kv_heads: int = 1  # the heads of each block, head_bytes apiece

    def __post_init__(self):
        if min(self.base, self.num_layers, self.num_blocks, self.block_bytes, self.kv_heads) <= 0 \
                or self.block_bytes % self.kv_heads:
            raise ValueError(f"invalid region {self}")

    @classmethod
    def from_shape(cls, base: int, shape: Sequence[int], itemsize: int) -> Region:
        """`shape` is the region tensor's shape [layers, 2, blocks, kv_heads, block_size, head_dim]."""
        if len(shape) != 6 or shape[1] != 2:
            raise ValueError(f"KV region shape must be [layers, 2, blocks, kv_heads, block_size, "
                             f"head_dim], got {list(shape)}")
        layers, _, blocks, kv_heads, block_size, head_dim = shape
        return cls(base, layers, blocks, block_size * kv_heads * head_dim * itemsize, kv_heads)

    @classmethod
    def from_tensor(cls, kv) -> Region:
        """The region of a (contiguous) KV cache tensor, e.g. engine.kv_cache.allocate_kv_cache()."""
        if not kv.is_contiguous():
            raise ValueError("a KV region must be contiguous: its addresses are computed, not looked up")
        return cls.from_shape(kv.data_ptr(), tuple(kv.shape), kv.element_size())

    @classmethod
    def from_handle(cls, handle: KVHandle, rank: int = 0) -> Region:
        """The remote region prefill rank `rank` described in the handle."""
        fp = handle.fingerprint
        return cls(handle.segments[rank].kv_base_ptr, fp.num_layers, handle.region_num_blocks,
                   handle.block_bytes, fp.heads_per_rank)

    @property
    def head_bytes(self) -> int:
        return self.block_bytes // self.kv_heads

    @property
    def nbytes(self) -> int:
        return self.num_layers * 2 * self.num_blocks * self.block_bytes

    def address(self, layer: int, plane: int, block: int) -> int:
        return self.base + ((layer * 2 + plane) * self.num_blocks + block) * self.block_bytes


def block_runs(remote_blocks: Sequence[int], local_blocks: Sequence[int]) -> list[tuple[int, int, int]]:
    """(remote_start, local_start, count) for each maximal run in which the remote ids and the
    local ids both step by +1 together; order follows the inputs (the token order)."""
    runs: list[tuple[int, int, int]] = []
    for r, l in zip(remote_blocks, local_blocks):
        if runs:
            r0, l0, n = runs[-1]
            if r == r0 + n and l == l0 + n:
                runs[-1] = (r0, l0, n + 1)
                continue
        runs.append((r, l, 1))
    return runs


def read_slices(local: Region, remote: Region, remote_blocks: Sequence[int],
                local_blocks: Sequence[int], layers: range | None = None) -> list[Slice]:
    """Slices that copy remote block remote_blocks[i] into local block local_blocks[i] for every
    layer (or only `layers`, layer-wise streaming) and both planes. Runs become one slice per
    (layer, plane); slices that happen to abut on both sides (e.g. whole regions) are merged too."""
    if local.block_bytes != remote.block_bytes:
        raise ValueError(f"regions disagree: local {local.block_bytes} B blocks, remote "
                         f"{remote.block_bytes} B blocks")
    runs = _checked_runs(local, remote, remote_blocks, local_blocks)
    slices: list[Slice] = []
    for layer in _layers(local, layers):
        for plane in (0, 1):
            for r0, l0, n in runs:
                slices.append((local.address(layer, plane, l0), remote.address(layer, plane, r0),
                               n * local.block_bytes))
    return merge_adjacent(slices)


def read_head_slices(local: Region, remote: Region, remote_blocks: Sequence[int],
                     local_blocks: Sequence[int], heads: tuple[int, int, int],
                     layers: range | None = None) -> list[Slice]:
    """Like read_slices, for `heads` = (first local head, first remote head, count) of each block:
    one slice per (layer, plane, block), each the heads' contiguous range of that block."""
    local_head, remote_head, count = heads
    if local.head_bytes != remote.head_bytes:
        raise ValueError(f"regions disagree: local {local.head_bytes} B heads, remote "
                         f"{remote.head_bytes} B heads")
    if local_head + count > local.kv_heads or remote_head + count > remote.kv_heads:
        raise ValueError(f"heads {heads} outside {local.kv_heads} local or {remote.kv_heads} remote heads")
    if count == local.kv_heads == remote.kv_heads:  # whole blocks: runs coalesce
        return read_slices(local, remote, remote_blocks, local_blocks, layers)
    blocks = [(r0 + i, l0 + i) for r0, l0, n in _checked_runs(local, remote, remote_blocks, local_blocks)
              for i in range(n)]
    lo, ro, n = local_head * local.head_bytes, remote_head * remote.head_bytes, count * local.head_bytes
    return merge_adjacent([(local.address(layer, plane, lb) + lo, remote.address(layer, plane, rb) + ro, n)
                           for layer in _layers(local, layers) for plane in (0, 1) for rb, lb in blocks])


def _layers(local: Region, layers: range | None) -> range:
    if layers is None:
        return range(local.num_layers)
    if layers.step != 1 or not 0 <= layers.start < layers.stop <= local.num_layers:
        raise ValueError(f"layers {layers.start}..{layers.stop} outside a region of {local.num_layers} layers")
    return layers


def _checked_runs(local: Region, remote: Region, remote_blocks: Sequence[int],
                  local_blocks: Sequence[int]) -> list[tuple[int, int, int]]:
    if local.num_layers != remote.num_layers:
        raise ValueError(f"regions disagree: local {local.num_layers} layers, remote {remote.num_layers}")
    if len(remote_blocks) != len(local_blocks):
        raise ValueError(f"{len(remote_blocks)} remote blocks but {len(local_blocks)} local blocks")
    _check_ids("remote", remote_blocks, remote.num_blocks)
    _check_ids("local", local_blocks, local.num_blocks)
    # Two remote blocks landing on one local block would race inside one batch: always a bug.
    if len(set(local_blocks)) != len(local_blocks):
        raise ValueError(f"local block ids repeat: {list(local_blocks)}")
    return block_runs(remote_blocks, local_blocks)


def merge_adjacent(slices: Sequence[Slice]) -> list[Slice]:
    """Merge each slice into its predecessor when both its local and remote ranges continue it."""
    merged: list[Slice] = []
    for loc, rem, n in slices:
        if merged:
            ploc, prem, pn = merged[-1]
            if ploc + pn == loc and prem + pn == rem:
                merged[-1] = (ploc, prem, pn + n)
                continue
        merged.append((loc, rem, n))
    return merged


def _check_ids(side: str, ids: Sequence[int], num_blocks: int) -> None:
    bad = [b for b in ids if not 0 <= b < num_blocks]
    if bad:
        raise ValueError(f"{side} block ids {bad} outside a region of {num_blocks} blocks")


def fingerprint_for(model_name: str, dtype, block_size: int, num_layers: int, num_kv_heads: int,
                    head_dim: int, tp_size: int = 1, tp_rank: int = 0,
                    quantization: str = "none") -> LayoutFingerprint:
    """The layout fingerprint both sides compute from their own config; `dtype` is a torch.dtype
    or its name, normalised to "bfloat16" style so the two sides compare strings, not objects."""
    name = str(dtype).removeprefix("torch.")
    for field, value in (("block_size", block_size), ("num_layers", num_layers),
                         ("num_kv_heads", num_kv_heads), ("head_dim", head_dim), ("tp_size", tp_size)):
        if value <= 0:
            raise ValueError(f"{field} must be positive, got {value}")
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank {tp_rank} outside tp_size {tp_size}")
    return LayoutFingerprint(model=model_name, dtype=name, block_size=block_size, num_layers=num_layers,
                             num_kv_heads=num_kv_heads, head_dim=head_dim, tp_size=tp_size,
                             tp_rank=tp_rank, quantization=quantization)

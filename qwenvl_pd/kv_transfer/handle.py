"""What decode needs to read a request's KV out of a prefill instance's registered region."""
from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class LayoutFingerprint:
    """The KV layout of one TP rank. Prefill and decode must agree on every field but the TP
    ones: tp_size with num_kv_heads says which heads each rank's region holds (a split, or
    replicas when tp_size > num_kv_heads), and any two valid splits of the same heads map."""
    model: str
    dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    tp_size: int = 1
    tp_rank: int = 0
    quantization: str = "none"  # W8A8 and float weights write different KV

    def mismatch(self, other: LayoutFingerprint, names: tuple[str, str] = ("prefill", "decode")
                 ) -> str | None:
        """None when the layouts agree, else the first differing field, e.g.
        "block_size: prefill 16, decode 32" (self is names[0], other is names[1])."""
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if f.name not in TP_FIELDS and mine != theirs:
                return f"{f.name}: {names[0]} {mine}, {names[1]} {theirs}"
        for name, fp in zip(names, (self, other)):
            if fp.num_kv_heads % fp.tp_size and fp.tp_size % fp.num_kv_heads:
                return (f"tp_size: {name} {fp.tp_size} cannot split {fp.num_kv_heads} KV heads "
                        "(neither divides the other)")
        return None

    @property
    def heads_per_rank(self) -> int:
        """KV heads in each rank's region (model.parallel.TensorParallel.kv_heads)."""
        return max(1, self.num_kv_heads // self.tp_size)


TP_FIELDS = ("tp_size", "tp_rank")


@dataclass(frozen=True)
class KVSegment:
    """Where one tensor-parallel rank's KV region lives."""
    transfer_address: str  # "host:port" of that rank's Mooncake transfer engine
    kv_base_ptr: int


@dataclass(frozen=True)
class KVHandle:
    """A request's KV blocks in the region [layers, 2 (K/V), region_num_blocks, kv_heads,
    block_size, head_dim] that prefill instance `instance_id` registered at `kv_base_ptr`; under
    tensor parallelism every rank registered its own region of its heads (rank_segments)."""
    instance_id: str
    transfer_address: str  # "host:port" of its Mooncake transfer engine
    kv_base_ptr: int
    block_bytes: int  # one block of one (layer, K|V) plane of one rank: heads_per_rank heads
    region_num_blocks: int
    block_ids: tuple[int, ...]
    num_tokens: int
    fingerprint: LayoutFingerprint
    lease_expires_unix_ms: int = 0  # prefill frees the blocks then, pulled or not
    control_address: str = ""  # "host:port" of the prefill's gRPC service, for Release
    # tensor parallel: ranks 1..N-1 (rank 0 is transfer_address, kv_base_ptr); the same block
    # ids in every rank's region hold that rank's heads
    rank_segments: tuple[KVSegment, ...] = ()
    signature: bytes = b""  # set by a prefill that has the cluster secret (protos/auth.py)
    request_id: str = ""  # the request it was issued for, signed with the rest

    def __post_init__(self):
        object.__setattr__(self, "block_ids", tuple(self.block_ids))
        object.__setattr__(self, "rank_segments", tuple(self.rank_segments))
        if len(self.rank_segments) != self.fingerprint.tp_size - 1:
            raise ValueError(f"a handle of tp_size {self.fingerprint.tp_size} needs "
                             f"{self.fingerprint.tp_size - 1} rank segments, got {len(self.rank_segments)}")
        if any(not 0 <= b < self.region_num_blocks for b in self.block_ids):
            raise ValueError(f"block ids {list(self.block_ids)} outside the region of "
                             f"{self.region_num_blocks} blocks")
        if not 0 < self.num_tokens <= len(self.block_ids) * self.fingerprint.block_size:
            raise ValueError(f"{self.num_tokens} tokens do not fit {len(self.block_ids)} blocks "
                             f"of {self.fingerprint.block_size}")

    @property
    def segments(self) -> tuple[KVSegment, ...]:
        """Every rank's region, rank order."""
        return (KVSegment(self.transfer_address, self.kv_base_ptr), *self.rank_segments)

    def block_address(self, layer: int, plane: int, block: int) -> int:
        """Remote address of block id `block` of `layer`, plane 0 (K) or 1 (V)."""
        return self.kv_base_ptr + ((layer * 2 + plane) * self.region_num_blocks + block) * self.block_bytes

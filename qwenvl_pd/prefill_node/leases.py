"""KV blocks of finished prefills, held until decode releases them or the lease runs out."""
import time
from dataclasses import dataclass


MAX_LEASE_S = 600.0  # a caller may ask for less than the node's default, never for days


def lease_seconds(requested_ms: int, default_s: float) -> float:
    """The lease a prefill grants: the request's (0: the node's default), at most MAX_LEASE_S."""
    return min(requested_ms / 1000 or default_s, MAX_LEASE_S)


@dataclass
class Lease:
    block_ids: list[int]
    expires_at: float  # time.monotonic()


class LeaseTable:
    """Engine thread only."""

    def __init__(self):
        self._leases: dict[str, Lease] = {}
        self.expired_total = 0

    def __len__(self) -> int:
        return len(self._leases)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._leases

    def add(self, request_id: str, block_ids: list[int], seconds: float) -> None:
        self._leases[request_id] = Lease(list(block_ids), time.monotonic() + seconds)

    def pop(self, request_id: str) -> list[int] | None:
        lease = self._leases.pop(request_id, None)
        return lease.block_ids if lease else None

    def pop_expired(self) -> list[tuple[str, list[int]]]:
        now = time.monotonic()
        gone = [rid for rid, lease in self._leases.items() if lease.expires_at <= now]
        self.expired_total += len(gone)
        return [(rid, self._leases.pop(rid).block_ids) for rid in gone]

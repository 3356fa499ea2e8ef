"""--allowed-prefills: the prefills a decode reads KV from (node/allowlist.py does the matching).
Without it (and without a cluster secret) decode would contact whatever control and transfer
address a caller's KV handle names."""
from __future__ import annotations

from collections.abc import Iterable

from qwenvl_pd.kv_transfer.handle import KVHandle
from qwenvl_pd.node.allowlist import HostAllowList


def prefill_allowlist(entries: Iterable[str]) -> HostAllowList:
    return HostAllowList(entries, "--allowed-prefills", "a prefill this decode reads from")


def handle_addresses(h: KVHandle) -> list[str]:
    """Every address a read of this handle contacts: its Release address and each rank's engine."""
    return [h.control_address, *(s.transfer_address for s in h.segments)]

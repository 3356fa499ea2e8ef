"""--allowed-encoders: the encoders a prefill reads embeddings from (node/allowlist.py does the
matching). Without it (and without a cluster secret, which makes prefill refuse unsigned
handles) prefill would read from, and send Release to, whatever addresses an embedding handle
names."""
from __future__ import annotations

from collections.abc import Iterable

from qwenvl_pd.kv_transfer.embedding_handle import EmbeddingHandle
from qwenvl_pd.node.allowlist import HostAllowList


def encoder_allowlist(entries: Iterable[str]) -> HostAllowList:
    return HostAllowList(entries, "--allowed-encoders", "an encoder this prefill reads from")


def handle_addresses(h: EmbeddingHandle) -> list[str]:
    """Every address this handle makes prefill contact: the encoder's engine and its Release."""
    return [h.transfer_address, h.control_address]

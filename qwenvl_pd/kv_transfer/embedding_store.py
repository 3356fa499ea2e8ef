"""The shared embedding tier: a Mooncake Store client (mooncake_master plus the memory its
clients lend), keyed like the encode pools (kv_transfer/embedding_key.py). Encoders put what
they encode; an encoder or a prefill that misses locally gets it from here.

Mooncake facts (mooncake-transfer-engine 0.3.x): setup() mounts `segment_bytes` of this
process's memory into the store (objects may be placed there: they live as long as this
process), `buffer_bytes` is its local staging buffer; get() of an absent key returns b"".
"""
from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)
PREFIX = "qwenvl-pd/embedding/"  # the store may be shared with other users of the master


class StoreError(RuntimeError):
    """The store could not be joined."""


class EmbeddingStore:
    def __init__(self, master: str, host: str = "127.0.0.1", segment_bytes: int = 256 << 20,
                 buffer_bytes: int = 64 << 20, protocol: str = "tcp", device: str = ""):
        from mooncake.store import MooncakeDistributedStore  # optional extra, like the engine

        self.master = master
        self._store = MooncakeDistributedStore()
        rc = self._store.setup(host, "P2PHANDSHAKE", segment_bytes, buffer_bytes, protocol, device, master)
        if rc != 0:
            raise StoreError(f"Mooncake Store setup against master {master} failed with return code {rc}")
        self._lock = threading.Lock()  # one call at a time: the client is shared by threads
        self._closed = False

    def put(self, key: str, data: bytes) -> bool:
        """Store data under key -> whether it is there now (False: logged, the store is optional)."""
        with self._lock:
            if self._closed:
                return False
            rc = self._store.put(PREFIX + key, data)
        if rc != 0:
            log.warning("embedding store put %s... (%d bytes) failed: return code %d", key[:16], len(data), rc)
        return rc == 0

    def get(self, key: str) -> bytes | None:
        """The bytes under key, or None when the store does not hold them."""
        with self._lock:
            if self._closed:
                return None
            data = self._store.get(PREFIX + key)
        return bytes(data) if data else None

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._store.close()

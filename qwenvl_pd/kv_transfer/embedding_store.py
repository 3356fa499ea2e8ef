"""The shared embedding tier: a Mooncake Store client (mooncake_master plus the memory its
clients lend), keyed like the encode pools (kv_transfer/embedding_key.py). Encoders put what
they encode; an encoder or a prefill that misses locally gets it from here.

Mooncake facts (mooncake-transfer-engine 0.3.x): setup() mounts `segment_bytes` of this
process's memory into the store (objects may be placed there: they live as long as this
process), `buffer_bytes` is its local staging buffer; get() of an absent key returns b"".
"""
from __future__ import annotations

import logging
import shutil
import socket
import threading
from pathlib import Path

log = logging.getLogger(__name__)
PREFIX = "qwenvl-pd/embedding/"  # the store may be shared with other users of the master
CONNECT_S = 5.0  # setup() retries an absent master for about 90 s: fail fast and say why


class StoreError(ValueError):
    """The store could not be joined: a bad --embedding-store, said in one line."""


class EmbeddingStore:
    def __init__(self, master: str, host: str = "127.0.0.1", segment_bytes: int = 256 << 20,
                 buffer_bytes: int = 64 << 20, protocol: str = "tcp", device: str = ""):
        from mooncake.store import MooncakeDistributedStore  # optional extra, like the engine

        _check_reachable(master)
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


def master_command(port: int, metrics_port: int, host: str = "127.0.0.1") -> list[str]:
    """The command line of a mooncake_master (the binary the wheel ships) on host:port; its
    metrics server needs a port of its own (default 9003 would clash between runs)."""
    return [_binary("mooncake_master"), f"--rpc_port={port}", f"--rpc_address={host}",
            f"--metrics_port={metrics_port}"]


def holder_command(master: str, port: int, segment_bytes: int, host: str = "127.0.0.1") -> list[str]:
    """The command line of a `mooncake_client` that only lends segment_bytes to the store: the
    objects placed there outlive the encoders that put them (an encoder's own segment goes with
    it). It listens on host:port once ready."""
    return [_binary("mooncake_client"), f"--master_server_address={master}", f"--host={host}",
            f"--port={port}", f"--global_segment_size={segment_bytes}", "--metadata_server=P2PHANDSHAKE",
            "--protocol=tcp"]


def _binary(name: str) -> str:
    import mooncake
    bundled = Path(mooncake.__file__).parent / name
    found = str(bundled) if bundled.is_file() else shutil.which(name)
    if found is None:
        raise StoreError(f"no {name} binary: install mooncake-transfer-engine")
    return found


def _check_reachable(master: str) -> None:
    host, _, port = master.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_S).close()
    except (OSError, ValueError) as e:
        raise StoreError(f"no mooncake_master answers at {master!r} (--embedding-store HOST:PORT): {e}") from None

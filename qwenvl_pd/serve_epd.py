"""serve's encode side (`serve --num-encode N`, EPD): the encoders' command lines and the
Mooncake Store of `--embedding-store mooncake` (torch-free: serve imports it).

The store is a mooncake_master plus one mooncake_client that only lends it memory: Mooncake
Store objects live in the memory their clients lend, so serve's encoders lend none and what they
put survives an encoder's restart (kv_transfer/embedding_store.py builds both command lines).
"""
from __future__ import annotations

import socket

from qwenvl_pd.kv_transfer import embedding_store

STORES = ("", "mooncake")  # "": each encoder's own pool only (the P2P path)


def master_command(port: int, metrics_port: int) -> list[str]:
    """The wheel's mooncake_master on loopback (a missing wheel: one RuntimeError line)."""
    return _command(embedding_store.master_command, port, metrics_port)


def holder_command(master: str, port: int, gib: float) -> list[str]:
    """The mooncake_client lending the store `gib` of its memory, on loopback."""
    return _command(embedding_store.holder_command, master, port, int(gib * (1 << 30)))


def _command(build, *args) -> list[str]:
    try:
        return build(*args)
    except (ImportError, embedding_store.StoreError) as e:
        raise RuntimeError(f"--embedding-store mooncake: {e} (pip install mooncake-transfer-engine)") from None


def encode_args(model: str, port: int, device: str, cpus: str, cache_gib: float, store: str) -> list[str]:
    """One `qwenvl-pd encode` on loopback; the cluster secret reaches it through the environment
    (QWENVL_PD_CLUSTER_SECRET), as it reaches prefill and decode. With a store it lends none of
    its memory: the holder does, so its entries outlive it."""
    args = ["--model", model, "--port", str(port), "--host", "127.0.0.1", "--bind", "127.0.0.1",
            "--device", device, "--embedding-cache-gib", str(cache_gib)]
    store_args = ["--embedding-store", store, "--embedding-store-segment-gib", "0"] if store else []
    return args + (["--cpus", cpus] if cpus else []) + store_args


def tcp_open(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False

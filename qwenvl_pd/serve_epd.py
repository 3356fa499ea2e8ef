"""serve's encode side (`serve --num-encode N`, EPD): the encoders' command lines and the
Mooncake master of `--embedding-store mooncake` (torch-free: serve imports it)."""
from __future__ import annotations

import importlib.util
import shutil
import socket
import sys
from pathlib import Path

MASTER = "mooncake_master"
STORES = ("", "mooncake")  # "": each encoder's own pool only (the P2P path)


def mooncake_master() -> str:
    """The wheel's mooncake_master: the binary in the mooncake package, else the launcher next
    to this Python (a venv's bin), else one on PATH."""
    spec = importlib.util.find_spec("mooncake")
    candidates = [Path(spec.origin).with_name(MASTER)] if spec and spec.origin else []
    candidates.append(Path(sys.executable).with_name(MASTER))
    for path in candidates:
        if path.is_file():
            return str(path)
    found = shutil.which(MASTER)
    if found is None:
        raise RuntimeError(f"--embedding-store mooncake: no {MASTER} in the mooncake package, beside "
                           f"{sys.executable} or on PATH (pip install mooncake-transfer-engine)")
    return found


def master_args(port: int, metrics_port: int) -> list[str]:
    """Loopback only: the store's RPC port and its admin/metrics port; no periodic metrics line
    (it would fill serve's terminal every few seconds)."""
    return ["-rpc_port", str(port), "-rpc_address", "127.0.0.1", "-metrics_host", "127.0.0.1",
            "-metrics_port", str(metrics_port), "-enable_metric_reporting=false"]


def encode_args(model: str, port: int, device: str, cpus: str, cache_gib: float, store: str) -> list[str]:
    """One `qwenvl-pd encode` on loopback; the cluster secret reaches it through the environment
    (QWENVL_PD_CLUSTER_SECRET), as it reaches prefill and decode."""
    args = ["--model", model, "--port", str(port), "--host", "127.0.0.1", "--bind", "127.0.0.1",
            "--device", device, "--embedding-cache-gib", str(cache_gib)]
    return args + (["--cpus", cpus] if cpus else []) + (["--embedding-store", store] if store else [])


def tcp_open(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False

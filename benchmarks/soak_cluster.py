"""The soak's cluster: prefill, decode and (optionally) encode processes on loopback that can be
killed, stopped (SIGSTOP), drained (SIGTERM) and restarted on the same port, and the proxy in
front of them."""
from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from qwenvl_pd.process import terminate
from qwenvl_pd.proxy.cluster import pd_client
from qwenvl_pd.proxy.cluster.instance import Instance
from qwenvl_pd.serve import grpc_serving, http_ok

NODE_ARGS = ["--max-model-len", "2048", "--kv-cache-gib", "0.05", "--threads", "1", "--lease-seconds", "4",
             "--transfer-timeout", "2", "--drain-seconds", "3", "--max-queued-requests", "8"]
ENCODE_ARGS = ["--embedding-cache-gib", "0.05", "--threads", "1", "--lease-seconds", "4", "--drain-seconds", "3"]
ENCODE_TIMEOUT_S = 5  # the proxy's --encode-timeout: a stopped encoder costs a request this much
START_S = 180
ROLE_OF = {"p": "prefill", "d": "decode", "e": "encode"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(args: list[str]) -> subprocess.Popen:
    log = tempfile.TemporaryFile("w+")  # a pipe nobody drains would stall a chatty process
    proc = subprocess.Popen([sys.executable, "-m", "qwenvl_pd.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=log, text=True)
    proc.log = log
    return proc


def tail(proc: subprocess.Popen, n: int = 3000) -> str:
    proc.log.seek(0)
    return proc.log.read()[-n:]


@dataclass
class Node:
    name: str  # p0, d1, e0, ...
    model: str
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    stopped: bool = False  # SIGSTOPped now

    @property
    def role(self) -> str:
        return ROLE_OF[self.name[0]]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = _spawn([self.role, "--model", self.model, "--port", str(self.port), "--host", "127.0.0.1",
                            "--bind", "127.0.0.1", *(ENCODE_ARGS if self.role == "encode" else NODE_ARGS)])
        self.stopped = False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            self.proc.send_signal(sig)
            if sig in (signal.SIGSTOP, signal.SIGCONT):
                self.stopped = sig == signal.SIGSTOP

    def stop(self) -> None:
        if not self.alive():
            return
        self.signal(signal.SIGCONT)
        terminate(self.proc)


def wait_serving(nodes: list[Node], timeout: float = START_S) -> None:
    deadline = time.monotonic() + timeout
    for node in nodes:
        while not grpc_serving(node.address):
            if not node.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{node.name} did not start:\n{tail(node.proc)}")
            time.sleep(0.2)


def start_proxy(nodes: list[Node], port: int, token_timeout: float,
                kv_transfer_mode: str = "whole") -> subprocess.Popen:
    addrs = {role: ",".join(n.address for n in nodes if n.role == role) for role in ROLE_OF.values()}
    encode = ["--encode", addrs["encode"], "--encode-timeout", str(ENCODE_TIMEOUT_S)] if addrs["encode"] else []
    proc = _spawn(["proxy", "--host", "127.0.0.1", "--port", str(port), "--prefill", addrs["prefill"],
                   "--decode", addrs["decode"], "--health-interval", "0.5", "--load-interval", "0.5",
                   "--token-timeout", str(token_timeout), "--prefill-timeout", "30",
                   "--max-concurrent-requests", "24", "--kv-transfer-mode", kv_transfer_mode, *encode])
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline and proc.poll() is None:
        if http_ok(f"http://127.0.0.1:{port}/health"):
            return proc
        time.sleep(0.3)
    raise RuntimeError(f"the proxy did not start:\n{tail(proc)}")


async def in_use(node: Node) -> int | None:
    """What the node holds for requests: used KV blocks, an encoder's pinned embedding leases;
    None when it does not answer."""
    inst = Instance.connect(node.role, node.address)
    try:
        load = await pd_client.load(inst, node.role)
        return load.embedding_leases if node.role == "encode" else load.blocks_used
    except Exception:  # noqa: BLE001 - a node that is down has no count to give
        return None
    finally:
        await inst.channel.close()


async def settled_blocks(nodes: list[Node], timeout: float) -> dict[str, int | None]:
    """Each live node's used blocks (an encoder's pinned leases), once all are 0 or timeout has
    passed (leases expire)."""
    deadline = time.monotonic() + timeout
    while True:
        used = {n.name: await in_use(n) for n in nodes if n.alive()}
        if all(v == 0 for v in used.values()) or time.monotonic() > deadline:
            return used
        await asyncio.sleep(0.5)

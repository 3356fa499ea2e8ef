"""Start real prefill/decode processes on loopback and talk to them like the proxy does (through
PDBackend, the proxy's own request flow)."""
import io
import logging
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

from qwenvl_pd.serve import grpc_serving

STARTUP_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(address: str, proc: subprocess.Popen, timeout: float = STARTUP_S) -> None:
    # a fresh channel each try: one kept across failed connects backs off (1 s, 1.6 s, 2.6 s, ...)
    # and would notice a node that came up seconds after it did
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            proc.log.seek(0)
            raise RuntimeError(f"{address} exited with {proc.returncode}:\n{proc.log.read()[-5000:]}")
        if grpc_serving(address):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{address} not healthy after {timeout}s")


def start_node(role: str, model: str, *extra: str) -> tuple[subprocess.Popen, str]:
    proc, address = spawn_node(role, model, *extra)
    wait_healthy(address, proc)
    return proc, address


def spawn_node(role: str, model: str, *extra: str) -> tuple[subprocess.Popen, str]:
    """start_node without waiting for health: start several, then wait_healthy each."""
    port = free_port()
    cmd = [sys.executable, "-m", "qwenvl_pd.cli", role, "--model", model, "--port", str(port),
           "--host", "127.0.0.1", "--bind", "127.0.0.1", "--max-model-len", "2048",
           "--kv-cache-gib", "0.05", "--threads", "1", *extra]
    # logs go to a file: a pipe nobody drains would stall a chatty process once it fills
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True)
    proc.log = log
    return proc, f"127.0.0.1:{port}"


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


def stop_all(procs) -> None:
    """SIGTERM every one first, then wait for each: their shutdowns overlap."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        stop(proc)


@contextmanager
def pd_pair(model: str, prefill_args=(), decode_args=()):
    procs = []
    try:  # both load at once: start-up is most of a short test
        (p, p_addr), (d, d_addr) = spawn_node("prefill", model, *prefill_args), spawn_node("decode", model, *decode_args)
        procs += [p, d]
        wait_healthy(p_addr, p)
        wait_healthy(d_addr, d)
        yield (p, p_addr), (d, d_addr)
    finally:
        stop_all(procs)


class Spares:
    """Nodes that a module's tests each use once, all spawned when the module starts: their
    start-ups overlap one another's and the earlier tests' instead of each adding its own.
    specs: name -> (role, model, extra args)."""

    def __init__(self, specs: dict[str, tuple[str, str, tuple]]):
        self.nodes = {name: spawn_node(role, model, *extra) for name, (role, model, extra) in specs.items()}

    def take(self, name: str) -> tuple[subprocess.Popen, str]:
        proc, address = self.nodes[name]
        wait_healthy(address, proc)
        return proc, address

    def stop(self) -> None:
        stop_all([proc for proc, _ in self.nodes.values()])


def rank_children(pid: int) -> list[int]:
    """The rank processes a node spawned (multiprocessing's resource tracker is not one)."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(c) for c in out if "resource_tracker" not in Path(f"/proc/{c}/cmdline").read_text()]


def loads(addresses: dict[str, str]) -> dict:
    """LoadReport of each named instance ("p..." prefill, "d..." decode), as the proxy polls them."""
    import asyncio
    from qwenvl_pd.proxy.cluster import pd_client
    from qwenvl_pd.proxy.cluster.instance import Instance

    async def one(name):
        role = "prefill" if name[0] == "p" else "decode"
        inst = Instance.connect(role, addresses[name])
        try:
            return await pd_client.load(inst, role)
        finally:
            await inst.channel.close()

    async def all_():
        return dict(zip(addresses, await asyncio.gather(*(one(n) for n in addresses))))
    return asyncio.run(all_())


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@asynccontextmanager
async def pd_backend(prefills: list[str], decodes: list[str], layerwise: bool = False, **backend_args):
    """The proxy's production request flow (PDBackend over a Router) on these instances, all
    healthy after one health round; no background rounds: a test's calls decide what fails."""
    from qwenvl_pd.proxy.cluster.backend import PDBackend
    from qwenvl_pd.proxy.cluster.router import Router
    from qwenvl_pd.proxy.metrics import ProxyMetrics
    router = Router(ProxyMetrics())
    router.set_members("prefill", prefills)
    router.set_members("decode", decodes)
    await router.health_round()
    try:
        yield PDBackend(router, layerwise=layerwise, **backend_args)
    finally:
        await router.stop()


class FellBack(logging.Handler):
    """Records the layer-wise round's warnings: each is a fallback to the whole-KV path."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


async def run_backend(backend, req, key: bytes = b"") -> tuple[list[int], str]:
    """(token ids, finish reason) of one request through PDBackend; a layer-wise backend must not
    fall back to the whole-KV round (that path has tests of its own)."""
    watch = logging.getLogger("qwenvl_pd.proxy.cluster.layerwise_round")
    fell_back = FellBack()
    watch.addHandler(fell_back)
    tokens, reason = [], ""
    try:
        async for event in backend.generate(req, key or req.request_id.encode()):
            tokens += [event.token.token_id] if event.token is not None else []
            reason = event.finish_reason or reason
    finally:
        watch.removeHandler(fell_back)
    assert not (backend.layerwise and fell_back.messages), fell_back.messages
    return tokens, reason


async def pd_generate(p_addr: str, d_addr: str, req, layerwise: bool = False) -> tuple[list[int], str]:
    async with pd_backend([p_addr], [d_addr], layerwise) as backend:
        return await run_backend(backend, req)

"""epd_parity's cluster for one checkpoint, all on loopback: a Mooncake Store (mooncake_master
plus a mooncake_client lending it memory), prefills and decodes at TP 1 and 2, an encoder without
the store (e0) and one with it (es), and one proxy per route (a proxy per prefill/encoder pair:
the route, not the router, decides which prefill and encoder a request meets). EPD and EPD with
the store go through different prefills, so each prefill reads its handles (the two encoders'
handles share a key: one prefill would read the first and hit its own cache for the second)."""
from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import httpx
import openai

from qwenvl_pd import serve_epd
from qwenvl_pd.process import die_with_parent, free_port, terminate
from qwenvl_pd.proxy.cluster import pd_client
from qwenvl_pd.proxy.cluster.instance import Instance
from qwenvl_pd.serve import grpc_serving, http_ok

START_S = 600  # eleven torch processes load at once on a shared 2-core machine
NODE_ARGS = ["--max-model-len", "2048", "--kv-cache-gib", "0.05", "--threads", "1"]
ENCODE_ARGS = ["--embedding-cache-gib", "0.05", "--threads", "1"]
# name -> (role, tensor-parallel size, uses the store); every prefill may get from the store
NODES = {"p0": ("prefill", 1, True), "p1": ("prefill", 1, True), "d0": ("decode", 1, False),
         "p2": ("prefill", 2, True), "p3": ("prefill", 2, True), "d2": ("decode", 2, False),
         "e0": ("encode", 1, False), "es": ("encode", 1, True)}
# proxy -> (prefill, decode, encoder or None for PD)
PROXIES = {"pd1": ("p0", "d0", None), "epd1": ("p0", "d0", "e0"), "epds1": ("p1", "d0", "es"),
           "epd1b": ("p1", "d0", "e0"), "epds1a": ("p0", "d0", "es"),
           "pd2": ("p2", "d2", None), "epd2": ("p2", "d2", "e0"), "epds2": ("p3", "d2", "es")}


@dataclass
class Proc:
    argv: list[str]  # without the port: added at start, the same on a restart
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, cli: bool = True) -> None:
        self.log = tempfile.TemporaryFile("w+")  # a pipe nobody drains would stall the process
        argv = [sys.executable, "-m", "qwenvl_pd.cli", *self.argv, "--port", str(self.port)] if cli else self.argv
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=self.log, text=True,
                                     preexec_fn=die_with_parent)

    def wait(self, ready, what: str, deadline: float) -> None:
        while not ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.log.seek(0)
                raise RuntimeError(f"{what} did not start (exit {self.proc.poll()}):\n{self.log.read()[-4000:]}")
            time.sleep(0.3)

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc)


class Cluster:
    def __init__(self, model: str):
        self.model, self.nodes, self.proxies, self.store = model, {}, {}, []

    def start_store(self) -> str:
        """The master and the holder lending it 64 MiB -> the master's address."""
        master = Proc([])
        master.argv = serve_epd.master_command(master.port, free_port())
        holder = Proc([])
        holder.argv = serve_epd.holder_command(master.address, holder.port, 1 / 16)
        for proc in (master, holder):
            proc.start(cli=False)
            proc.wait(lambda: serve_epd.tcp_open(proc.address), proc.argv[0], time.monotonic() + 60)
            self.store.append(proc)
        return master.address

    def spawn_nodes(self, master: str) -> None:
        """Every node starts loading; wait_nodes() waits for them."""
        for name, (role, tp, store) in NODES.items():
            args = ENCODE_ARGS if role == "encode" else [*NODE_ARGS, "--tensor-parallel-size", str(tp)]
            store_args = ["--embedding-store", master] if store else []
            store_args += ["--embedding-store-segment-gib", "0"] if store and role == "encode" else []
            self.nodes[name] = Proc([role, "--model", self.model, "--host", "127.0.0.1", "--bind", "127.0.0.1",
                                     *args, *store_args])
            self.nodes[name].start()

    def wait_nodes(self) -> None:
        deadline = time.monotonic() + START_S
        for name, node in self.nodes.items():
            node.wait(lambda: grpc_serving(node.address), name, deadline)

    def start_proxies(self) -> None:
        for name, (p, d, e) in PROXIES.items():
            encode = ["--encode", self.nodes[e].address] if e else []
            self.proxies[name] = Proc(["proxy", "--host", "127.0.0.1", "--prefill", self.nodes[p].address,
                                       "--decode", self.nodes[d].address, "--health-interval", "0.5",
                                       "--load-interval", "0.5", "--max-image-pixels", "4000000", *encode])
            self.proxies[name].start()
        deadline = time.monotonic() + START_S
        for name, proxy in self.proxies.items():
            proxy.wait(lambda: http_ok(self.url(name) + "/health"), name, deadline)
        self.served = self.client("pd1").models.list().data[0].id

    def url(self, proxy: str) -> str:
        return f"http://{self.proxies[proxy].address}"

    def client(self, proxy: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url(proxy) + "/v1", api_key="none", timeout=300, max_retries=0)

    def metrics_text(self, proxy: str) -> str:
        return httpx.get(self.url(proxy) + "/metrics", timeout=10).text

    def metric(self, proxy: str, name: str) -> float:
        values = re.findall(rf"^qwenvl_pd:{name}(?:{{[^}}]*}})? (\S+)$", self.metrics_text(proxy), re.M)
        return sum(map(float, values))

    def load(self, node: str):
        """The node's LoadReport, as the proxy polls it."""
        role = NODES[node][0]

        async def one():
            inst = Instance.connect(role, self.nodes[node].address)
            try:
                return await pd_client.load(inst, role)
            finally:
                await inst.channel.close()
        return asyncio.run(one())

    def stop(self) -> None:
        for proc in [*self.proxies.values(), *self.nodes.values(), *reversed(self.store)]:
            proc.stop()

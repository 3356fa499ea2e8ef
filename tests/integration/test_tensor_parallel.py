"""Tensor parallelism end to end: prefill and decode instances of 2 ranks each (gloo on CPU),
behind the proxy, against the colocated engine at 2 ranks; and a rank that dies mid-stream."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest

from qwenvl_pd.model.tiny import make_tiny

from nodes import free_port, loads, stop
from test_proxy import NODE_ARGS, _cli, _image, _image_messages, _log, _wait_node, start_proxy

TP = ["--tensor-parallel-size", "2", "--threads", "1"]
GREEDY = dict(max_tokens=12, temperature=0, extra_body={"ignore_eos": True})


class TPCluster:
    """One prefill and two decodes, 2 ranks each, and the colocated engine at 2 ranks."""

    def __init__(self, model: str):
        self.model, self.procs, self.addr = model, {}, {}

    def start(self) -> None:
        for name in ("p0", "d0", "d1"):
            port = free_port()
            role = "prefill" if name[0] == "p" else "decode"
            self.procs[name] = _cli(role, "--model", self.model, "--port", str(port), *NODE_ARGS, *TP)
            self.addr[name] = f"127.0.0.1:{port}"
        for name, proc in self.procs.items():
            _wait_node(self.addr[name], proc)
        self.proxy, self.url = start_proxy("--prefill", self.addr["p0"],
                                           "--decode", f"{self.addr['d0']},{self.addr['d1']}")
        self.colocated, self.colocated_url = start_proxy(
            "--colocated-model", self.model, "--max-model-len", "2048", "--kv-cache-gib", "0.05",
            "--tensor-parallel-size", "2")

    def loads(self) -> dict:
        return loads({n: self.addr[n] for n, p in self.procs.items() if p.poll() is None})

    def stop(self) -> None:
        for proc in [getattr(self, "proxy", None), getattr(self, "colocated", None), *self.procs.values()]:
            if proc is not None:
                stop(proc)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = TPCluster(str(make_tiny("qwen2_5_vl", tmp_path_factory.mktemp("tp") / "tiny")))
    try:
        c.start()
        yield c
    finally:
        c.stop()


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=60, max_retries=0)


def _rank_children(pid: int) -> list[int]:
    """The rank processes a node spawned (multiprocessing's resource tracker is not one)."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(c) for c in out if "resource_tracker" not in Path(f"/proc/{c}/cmdline").read_text()]


def test_pd_at_tp2_equals_colocated_at_tp2_then_every_pool_is_free(cluster):
    pd, colocated = _client(cluster.url), _client(cluster.colocated_url)
    requests = [[{"role": "user", "content": "Write a haiku about the sea."}],
                _image_messages(_image(), "What is in the picture?")]
    for messages in requests:
        want = colocated.chat.completions.create(model="tiny", messages=messages, **GREEDY)
        got = pd.chat.completions.create(model="tiny", messages=messages, **GREEDY)
        stream = pd.chat.completions.create(model="tiny", messages=messages, stream=True, **GREEDY)
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert got.usage.completion_tokens == want.usage.completion_tokens == 12
        assert got.choices[0].message.content == want.choices[0].message.content == streamed
    time.sleep(0.5)  # Release reaches prefill just after decode's first token
    assert {n: (r.blocks_used, r.running) for n, r in cluster.loads().items()} == \
        {"p0": (0, 0), "d0": (0, 0), "d1": (0, 0)}


def test_a_decode_rank_killed_mid_stream_ends_the_stream_with_an_error(cluster):
    pd = _client(cluster.url)
    stream = pd.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "a long answer"}], stream=True,
        max_tokens=1500, temperature=0, extra_body={"ignore_eos": True})
    chunks = iter(stream)
    next(chunks)  # the first token comes from prefill
    for _ in range(3):  # these come from decode: the failure below is mid-stream, not before its
        next(chunks)    # first token (where the proxy hands the request to the other decode)
    deadline, busy = time.monotonic() + 10, []
    while not busy and time.monotonic() < deadline:
        busy = [n for n, r in cluster.loads().items() if n[0] == "d" and r.running]
    assert len(busy) == 1, busy
    victim, other = busy[0], ({"d0", "d1"} - set(busy)).pop()
    ranks = _rank_children(cluster.procs[victim].pid)
    assert len(ranks) == 1, ranks
    os.kill(ranks[0], signal.SIGKILL)
    with pytest.raises(openai.APIError):
        for _ in chunks:
            pass
    assert cluster.procs[victim].wait(timeout=30) == 1  # the instance exits non-zero
    deadline = time.monotonic() + 10
    while "UNHEALTHY" not in _log(cluster.proxy) and time.monotonic() < deadline:
        time.sleep(0.2)
    noticed = [ln for ln in _log(cluster.proxy).splitlines() if cluster.addr[victim] in ln]
    assert any("UNHEALTHY" in ln or "out of rotation" in ln for ln in noticed), noticed
    # the prefill and the other decode serve on
    after = pd.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], **GREEDY)
    assert after.usage.completion_tokens == 12
    assert cluster.loads()[other].requests_total >= 1
    assert httpx.get(cluster.url + "/health", timeout=5).status_code == 200

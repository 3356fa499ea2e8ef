"""EPD end to end on loopback: real `qwenvl-pd encode`, prefill, decode and proxy processes on the
tiny model, driven by the official openai client. Greedy output through an encoder equals PD's;
the same image sent through two prefills is encoded once (the encoder's load report: one miss,
one hit); a killed encoder costs the client nothing (prefill encodes the bytes itself); a stopped
one is replaced by the next encoder; a prefill that may not read from the encoder
(--allowed-encoders) gets the bytes; a proxy whose encoder never came up serves as PD.

The tests with an encoder are skipped until `qwenvl-pd encode` exists on this branch (the encode
node lands separately)."""
from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import httpx
import openai
import pytest

from qwenvl_pd.messages import ENCODE
from qwenvl_pd.serve import http_ok

from nodes import free_port, stop_all
from test_proxy import NODE_ARGS, _cli, _image, _image_messages, _wait_http, _wait_node, spawn_proxy


def _encode_cli_missing() -> str:
    r = subprocess.run([sys.executable, "-m", "qwenvl_pd.cli", "encode", "--help"], capture_output=True,
                       text=True, timeout=120)
    last = (r.stderr.strip().splitlines() or [""])[-1]
    if r.returncode:
        return f"`qwenvl-pd encode --help` failed (no encode node on this branch): {last}"
    if importlib.util.find_spec("qwenvl_pd.prefill_node.embedding_reader") is None:
        return "prefill cannot read embedding handles on this branch (prefill_node/embedding_reader.py)"
    return ""


MISSING = _encode_cli_missing()
needs_encoder = pytest.mark.skipif(bool(MISSING), reason=MISSING or "the encode CLI is here")
GREEDY = dict(model="tiny", max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
SEEDED = dict(GREEDY, temperature=0.8, top_p=0.9, seed=1234)


class EPDCluster:
    """Nodes by name (p0, p1, p2, d0, e0, e1) and proxies by name, all on loopback."""

    def __init__(self, model: str):
        self.model, self.procs, self.addr, self.urls = model, {}, {}, {}

    def spawn(self, roles: tuple[tuple[str, str], ...]) -> None:
        """Start nodes without waiting: wait() waits for everything spawned."""
        for name, role, *extra in roles:
            port = free_port()
            args = NODE_ARGS if role != ENCODE else ["--host", "127.0.0.1", "--embedding-cache-gib", "0.05"]
            self.procs[name] = _cli(role, "--model", self.model, "--port", str(port), *args, *extra)
            self.addr[name] = f"127.0.0.1:{port}"

    def spawn_proxy(self, name: str, prefill: str, encode: str | None) -> None:
        encoders = ",".join(self.addr.get(e, e) for e in encode.split(",")) if encode else ""
        extra = ["--encode", encoders] if encode else []
        self.procs[f"proxy-{name}"], self.urls[name] = spawn_proxy(
            "--prefill", self.addr[prefill], "--decode", self.addr["d0"], "--max-image-pixels", "4000000", *extra)

    def wait(self) -> None:
        for name, address in self.addr.items():
            _wait_node(address, self.procs[name])
        for name, url in self.urls.items():
            _wait_http(url, self.procs[f"proxy-{name}"])

    def client(self, name: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.urls[name] + "/v1", api_key="none", timeout=120, max_retries=0)

    def encoder_load(self, name: str = "e0"):
        import asyncio
        from qwenvl_pd.proxy.cluster import pd_client
        from qwenvl_pd.proxy.cluster.instance import Instance

        async def one():
            inst = Instance.connect(ENCODE, self.addr[name])
            try:
                return await pd_client.load(inst, ENCODE)
            finally:
                await inst.channel.close()
        return asyncio.run(one())

    def metric(self, proxy: str, name: str, labels: str = "") -> float:
        """The sum over the series of `name`, or the one with exactly these `labels` ('{...}')."""
        text = httpx.get(self.urls[proxy] + "/metrics", timeout=10).text
        series = re.escape(labels) if labels else r"(?:{[^}]*})?"
        values = re.findall(rf"^qwenvl_pd:{name}{series} (\S+)$", text, re.M)
        return sum(map(float, values))

    def stop(self) -> None:
        stop_all(self.procs.values())


@pytest.fixture(scope="module")
def cluster(tiny_model):
    """p0, p1, d0, the encoders e0 and e1, p2 (reads embeddings only from 10.255.255.1), the PD
    proxy "pd" (p0, no encoder) and the EPD proxies "a" (p0 + e0), "b" (p1 + e0), "two" (p1 +
    e0, e1) and "deny" (p2 + e0), all started at once: loading overlaps."""
    c = EPDCluster(tiny_model)
    try:
        c.spawn((("p0", "prefill"), ("p1", "prefill"), ("d0", "decode"), ("e0", ENCODE), ("e1", ENCODE),
                 ("p2", "prefill", "--allowed-encoders", "10.255.255.1")))
        for name, prefill, encode in (("pd", "p0", None), ("a", "p0", "e0"), ("b", "p1", "e0"),
                                      ("two", "p1", "e0,e1"), ("deny", "p2", "e0")):
            c.spawn_proxy(name, prefill, encode)
        c.wait()
        yield c
    finally:
        c.stop()


def _answer(cluster: EPDCluster, proxy: str, data: bytes, params: dict = GREEDY) -> str:
    r = cluster.client(proxy).chat.completions.create(messages=_image_messages(data), **params)
    assert r.choices[0].finish_reason == "length"
    return r.choices[0].message.content


def test_an_encoder_that_never_came_up_leaves_pd_serving(cluster):
    # ready without a healthy encoder (wait() waits for /health), and no round is tried
    pd = cluster
    pd.spawn_proxy("dead", "p1", f"127.0.0.1:{free_port()}")
    pd.wait()
    data = _image(120, 90, seed=3)
    assert _answer(pd, "dead", data) == _answer(pd, "pd", data)
    assert pd.metric("dead", "encode_rounds_total") == pd.metric("dead", "encode_fallbacks_total") == 0


@needs_encoder
def test_epd_equals_pd_and_a_repeated_image_is_encoded_once(cluster):
    data = _image(224, 168, seed=5)
    pd = _answer(cluster, "pd", data)
    assert _answer(cluster, "b", data) == pd  # p1 has never seen it: it reads e0's embeddings
    first = cluster.encoder_load()
    assert _answer(cluster, "a", data) == pd  # another prefill, the same image: e0's pool hit
    second = cluster.encoder_load()
    assert (first.embedding_misses, first.embedding_hits) == (1, 0)
    assert (second.embedding_misses, second.embedding_hits) == (1, 1)
    assert cluster.metric("b", "encode_rounds_total") == 1
    assert cluster.metric("b", "encode_fallbacks_total") == 0
    # p1 got it as a handle, so it holds it under the embedding key: a fresh handle again (a pool
    # hit on e0, a local hit on p1), never the bytes that would miss p1's caches
    assert _answer(cluster, "b", data) == pd
    assert cluster.metric("b", "encode_rounds_total") == 2
    assert cluster.metric("b", "encode_round_skips_total") == 0
    assert (cluster.encoder_load().embedding_misses, cluster.encoder_load().embedding_hits) == (1, 2)


@needs_encoder
def test_a_seeded_request_through_epd_equals_pd(cluster):
    # the sampler's seeded stream must not depend on where the image's rows came from
    data = _image(144, 108, seed=13)
    rounds = cluster.metric("b", "encode_rounds_total")
    assert _answer(cluster, "b", data, SEEDED) == _answer(cluster, "pd", data, SEEDED)
    assert cluster.metric("b", "encode_rounds_total") == rounds + 1  # it went through e0
    assert cluster.metric("b", "encode_fallbacks_total") == 0


@needs_encoder
def test_text_only_never_reaches_the_encoder(cluster):
    before = cluster.encoder_load()
    r = cluster.client("a").completions.create(prompt="Once upon a", **GREEDY)
    assert r.usage.completion_tokens == 8
    after = cluster.encoder_load()
    assert (after.embedding_hits, after.embedding_misses) == (before.embedding_hits, before.embedding_misses)


@needs_encoder
def test_a_prefill_that_may_not_read_from_the_encoder_gets_the_bytes(cluster):
    # p2's --allowed-encoders names another host: PERMISSION_DENIED before any read, then the
    # bytes to the same prefill; the leases the proxy got are released at once
    data = _image(136, 102, seed=17)
    assert _answer(cluster, "deny", data) == _answer(cluster, "pd", data)
    assert cluster.metric("deny", "encode_rounds_total") == 1
    assert cluster.metric("deny", "encode_fallbacks_total", '{reason="PERMISSION_DENIED"}') == 1
    assert cluster.metric("deny", "encode_fallbacks_total") == 1
    deadline = time.monotonic() + 10
    while cluster.encoder_load().embedding_leases and time.monotonic() < deadline:
        time.sleep(0.2)
    assert cluster.encoder_load().embedding_leases == 0


@needs_encoder
def test_a_stopped_encoder_falls_back_and_is_used_again_once_it_answers(cluster):
    data = _image(128, 96, seed=21)
    pd = _answer(cluster, "pd", data)
    rounds = cluster.metric("a", "encode_rounds_total")
    os.kill(cluster.procs["e0"].pid, signal.SIGSTOP)  # hung: it neither answers nor refuses
    try:
        assert _answer(cluster, "a", data) == pd  # given up once it misses health checks
        assert cluster.metric("a", "encode_fallbacks_total") >= 1
    finally:
        os.kill(cluster.procs["e0"].pid, signal.SIGCONT)
    for seed in range(30, 60):  # back in rotation after a health check passes
        _answer(cluster, "a", _image(64, 64, seed=seed))
        if cluster.metric("a", "encode_rounds_total") > rounds:
            break
        time.sleep(0.5)
    assert cluster.metric("a", "encode_rounds_total") > rounds


def _preferring(cluster: EPDCluster, encoder: str, others: tuple[str, ...]) -> bytes:
    """A fresh image whose content hash ranks `encoder` first among `others` (the proxy's
    rendezvous order), so that the round tries it first."""
    from qwenvl_pd.proxy.cluster.router import _rendezvous
    from qwenvl_pd.proxy.prompt.media import content_hash
    for seed in range(100, 200):
        data = _image(152, 114, seed=seed)
        rank = {e: _rendezvous(content_hash(data).encode(), cluster.addr[e]) for e in (encoder, *others)}
        if max(rank, key=rank.get) == encoder:
            return data
    raise AssertionError(f"no image prefers {encoder}")


@needs_encoder
def test_a_stopped_encoder_is_replaced_by_the_next_one_without_a_fallback(cluster):
    data = _preferring(cluster, "e1", ("e0",))
    pd = _answer(cluster, "pd", data)
    before = cluster.encoder_load("e0")
    os.kill(cluster.procs["e1"].pid, signal.SIGSTOP)  # hung: lost after two unanswered health checks
    try:
        assert _answer(cluster, "two", data) == pd  # e1 tried first, then e0: p1 read e0's rows
    finally:
        os.kill(cluster.procs["e1"].pid, signal.SIGCONT)
    after = cluster.encoder_load("e0")
    assert (after.embedding_misses, after.embedding_hits) == (before.embedding_misses + 1, before.embedding_hits)
    assert cluster.metric("two", "encode_retries_total", '{reason="UNAVAILABLE"}') == 1
    assert cluster.metric("two", "encode_rounds_total") == 1
    assert cluster.metric("two", "encode_fallbacks_total") == 0


@needs_encoder
def test_a_killed_encoder_falls_back_to_prefill_encoding(cluster):
    data = _image(160, 112, seed=9)
    pd = _answer(cluster, "pd", data)
    cluster.procs["e0"].kill()
    cluster.procs["e0"].wait(timeout=30)
    assert _answer(cluster, "a", data) == pd
    assert _answer(cluster, "b", _image(96, 64, seed=10))  # and again, once the proxy knows


@needs_encoder
def test_serve_num_encode_with_the_store_serves_images_and_stops_everything(serve_cache):
    # with the store only: it starts all the run without it does, plus the store's master and
    # holder; serve without --embedding-store starting no store is tests/unit/test_serve_epd.py's
    port = free_port()
    env = {**os.environ, "XDG_CACHE_HOME": str(serve_cache)}  # the tiny default model, built
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([sys.executable, "-m", "qwenvl_pd.cli", "serve", "--port", str(port), "--num-encode",
                             "1", "--embedding-cache-gib", "0.05", "--embedding-store", "mooncake",
                             "--embedding-store-gib", "0.0625"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    url, children = f"http://127.0.0.1:{port}", []
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline and not http_ok(url + "/health"):
            time.sleep(0.5)
        log.seek(0)
        assert proc.poll() is None, log.read()[-5000:]
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", timeout=120, max_retries=0)
        data, model = _image(112, 84, seed=4), client.models.list().data[0].id
        replies = [client.chat.completions.create(messages=_image_messages(data), **{**GREEDY, "model": model})
                   for _ in range(2)]
        assert replies[0].choices[0].message.content == replies[1].choices[0].message.content
        # the same handle key both times: the second prompt's image span is a prefix-cache hit
        assert replies[1].usage.prompt_tokens_details.cached_tokens > 0
        metrics = httpx.get(url + "/metrics", timeout=10).text
        assert "qwenvl_pd:encode_rounds_total 2\n" in metrics  # a miss, then a pool hit
        assert not re.search(r"^qwenvl_pd:encode_fallbacks_total\{", metrics, re.M)
        children = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                                   text=True).stdout.split()]
        names = sorted(_name(c) for c in children)
        # the store's master and the client lending it memory (the encoder lends none)
        assert names == ["decode", "encode", "mooncake_client", "mooncake_master", "prefill", "proxy"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    deadline = time.monotonic() + 15
    while any(os.path.exists(f"/proc/{c}") for c in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [c for c in children if os.path.exists(f"/proc/{c}")]


def _name(pid: int) -> str:
    """A serve child's role, or the master's binary name."""
    with open(f"/proc/{pid}/cmdline") as f:
        argv = f.read().split("\0")
    return argv[argv.index("qwenvl_pd.cli") + 1] if "qwenvl_pd.cli" in argv else os.path.basename(argv[0])

"""Layer-wise KV streaming (prefill's PrefillStream + WatchKV, decode reading each group of layers
while later ones compute) with real processes, real gRPC and Mooncake over TCP on loopback: the
output equals the offline engine's, and a prefill killed, a decode killed or an abort while the
layers stream leave every block on both sides free. One 2-layer cluster for the module; the
prefill reports every layer and prefills 32 tokens a step, so a long prompt streams for a while."""
import asyncio
import os
import signal
import time

import grpc
import numpy as np
import openai
import pytest
from PIL import Image

from qwenvl_pd import LLM, SamplingParams
from qwenvl_pd.messages import MediaItem, PrefillRequest
from qwenvl_pd.model.tiny import make_tiny
from qwenvl_pd.proxy.cluster import pd_client
from qwenvl_pd.proxy.cluster.instance import Instance

from nodes import pd_generate, png_bytes, spawn_node, stop, stop_all, wait_healthy
from test_proxy import _log, start_proxy

IMG = "<|vision_start|><|image_pad|><|vision_end|>"
PREFILL_ARGS = ("--max-num-batched-tokens", "32", "--kv-layer-group", "1", "--lease-seconds", "4",
                "--transfer-timeout", "2")
DECODE_ARGS = ("--transfer-timeout", "2")
LONG = "the quick brown fox jumps over the lazy dog " * 180  # ~1600 tokens: ~50 prefill steps


def _chat(body):
    return f"<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\n"


class Cluster:
    """A prefill and a decode, and one more of each for the tests that kill one (all started at
    once: start-up is most of this module's time)."""

    def __init__(self, model: str):
        nodes = [spawn_node(role, model, *args) for role, args in
                 (("prefill", PREFILL_ARGS), ("decode", DECODE_ARGS)) * 2]
        self.procs = [proc for proc, _ in nodes]
        self.llm = LLM(model=model, max_model_len=2048)
        for proc, address in nodes:
            wait_healthy(address, proc)
        (self.p, self.p_addr), (self.d, self.d_addr), (self.vp, self.vp_addr), (self.vd, self.vd_addr) = nodes

    def request(self, rid: str, request: dict, params: SamplingParams) -> PrefillRequest:
        images = (request.get("multi_modal_data") or {}).get("image", [])
        raw = [png_bytes(im) for im in images]
        prompt = self.llm.inputs.process({**request, "multi_modal_data": {"image": raw} if raw else {}})
        media = tuple(MediaItem(kind="image", content_hash=it.content_hash, grid_thw=it.grid_thw, data=b)
                      for it, b in zip(prompt.items, raw))
        return PrefillRequest(request_id=rid, prompt_token_ids=tuple(prompt.token_ids), media=media,
                              sampling=params)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    model = str(make_tiny("qwen2_5_vl", tmp_path_factory.mktemp("lw") / "tiny2",
                          text_overrides={"num_hidden_layers": 2}))
    c = Cluster(model)
    try:
        yield c
    finally:
        stop_all(c.procs)


def _image(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


async def _generate(c: Cluster, req: PrefillRequest) -> tuple[list[int], str]:
    return await pd_generate(c.p_addr, c.d_addr, req, layerwise=True)


async def _settled(c: Cluster, timeout=20, p_addr="", d_addr=""):
    """(prefill, decode) LoadReports once both hold no block, or at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        p, d = Instance.connect("prefill", p_addr or c.p_addr), Instance.connect("decode", d_addr or c.d_addr)
        loads = await pd_client.load(p, "prefill"), await pd_client.load(d, "decode")
        await p.channel.close()
        await d.channel.close()
        if (loads[0].blocks_used, loads[1].blocks_used) == (0, 0) or time.monotonic() > deadline:
            return loads
        await asyncio.sleep(0.2)


def test_layerwise_equals_offline_greedy_and_seeded(cluster):
    requests = [{"prompt": _chat(f"{IMG}What is this?"), "multi_modal_data": {"image": [_image(90, 70, 1)]}},
                {"prompt": _chat(LONG)}]  # ~50 chunks of 32 tokens on prefill
    params = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True)]
    for i, r in enumerate(requests):
        for j, sp in enumerate(params):
            expected = cluster.llm.generate(r, sp)[0].outputs[0]
            got = asyncio.run(_generate(cluster, cluster.request(f"eq{i}-{j}", r, sp)))
            assert got == (list(expected.token_ids), expected.finish_reason), f"request {i} params {j}"
    one = asyncio.run(_generate(cluster, cluster.request("one", requests[0], SamplingParams(max_tokens=1))))
    assert len(one[0]) == 1 and one[1] == "length"  # the first token ends it: decode lets go
    pl, dl = asyncio.run(_settled(cluster))
    assert (pl.blocks_used, dl.blocks_used) == (0, 0)
    assert dl.kv_transfers_total >= len(requests) * len(params)


async def _start_streaming(c: Cluster, rid: str, p_addr="", d_addr=""):
    """A long layer-wise request, waited on until decode has read some layers but prefill has
    not finished: (channels, prefill stream, decode stream, first-event task, result task)."""
    p, d = Instance.connect("prefill", p_addr or c.p_addr), Instance.connect("decode", d_addr or c.d_addr)
    # its own first words: no prefix-cache hit, every chunk computes
    req = c.request(rid, {"prompt": _chat(f"request {rid}: {LONG}")}, SamplingParams(max_tokens=64, temperature=0, ignore_eos=True))
    stream = pd_client.prefill_stream(p, req)
    announce = (await anext(stream)).announce
    decoding = pd_client.decode(d, pd_client.layerwise_request(req, announce))
    first = asyncio.ensure_future(anext(decoding))
    result = asyncio.ensure_future(anext(stream))
    while (await pd_client.load(d, "decode")).kv_transfer_bytes_total <= c.read_before:
        assert not result.done(), "prefill finished before any layer was read: widen the window"
        await asyncio.sleep(0.005)
    assert not result.done(), "prefill finished too soon"
    return (p, d), stream, decoding, first, result


def _read_before(c: Cluster, d_addr="") -> int:
    async def one():
        d = Instance.connect("decode", d_addr or c.d_addr)
        try:
            return (await pd_client.load(d, "decode")).kv_transfer_bytes_total
        finally:
            await d.channel.close()
    return asyncio.run(one())


def test_abort_between_layers_frees_both_sides(cluster):
    cluster.read_before = _read_before(cluster)

    async def scenario():
        (p, d), stream, decoding, first, result = await _start_streaming(cluster, "ab1")
        assert await pd_client.abort(d, "decode", "ab1")  # what the proxy does when the client leaves
        event = await asyncio.wait_for(first, 15)
        result.cancel()
        await asyncio.gather(result, return_exceptions=True)
        await stream.aclose()  # cancels PrefillStream: prefill aborts the sequence
        await decoding.aclose()
        for inst in (p, d):
            await inst.channel.close()
        return event, await _settled(cluster)

    event, (pl, dl) = asyncio.run(scenario())
    assert event.finish_reason == "abort" and event.token is None
    assert (pl.blocks_used, dl.blocks_used, pl.running, dl.running) == (0, 0, 0, 0)


def test_decode_killed_while_layers_arrive_frees_prefill(cluster):
    cluster.read_before = _read_before(cluster, cluster.vd_addr)

    async def scenario():
        (p, d), stream, decoding, first, result = await _start_streaming(cluster, "kd1", d_addr=cluster.vd_addr)
        os.kill(cluster.p.pid, signal.SIGSTOP)  # prefill holds still while decode dies
        try:
            cluster.vd.kill()
            cluster.vd.wait(timeout=10)
        finally:
            os.kill(cluster.p.pid, signal.SIGCONT)
        with pytest.raises(grpc.aio.AioRpcError):
            await asyncio.wait_for(first, 15)
        leased = (await asyncio.wait_for(result, 30)).result  # prefill finishes: its lease holds the KV
        held = (await pd_client.load(p, "prefill")).blocks_used
        await stream.aclose()
        await decoding.aclose()
        for inst in (p, d):
            await inst.channel.close()
        return leased, held

    leased, held = asyncio.run(scenario())
    assert held == len(leased.handle.block_ids) > 0
    pl, dl = asyncio.run(_settled(cluster))  # the lease (4 s) expires with nobody to release it
    assert (pl.blocks_used, dl.blocks_used) == (0, 0)


def test_prefill_silent_for_the_transfer_timeout_fails_decode_unavailable(cluster):
    cluster.read_before = _read_before(cluster)

    async def scenario():
        (p, d), stream, decoding, first, result = await _start_streaming(cluster, "st1")
        os.kill(cluster.p.pid, signal.SIGSTOP)
        try:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await asyncio.wait_for(first, 20)
        finally:
            os.kill(cluster.p.pid, signal.SIGCONT)
        result.cancel()
        await asyncio.gather(result, return_exceptions=True)
        await stream.aclose()
        await decoding.aclose()
        for inst in (p, d):
            await inst.channel.close()
        return err.value, await _settled(cluster)  # a timed-out read's blocks: once it settled

    error, (pl, dl) = asyncio.run(scenario())
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    # no report for the 2 s transfer timeout, or the group read in flight timing out after 2 s
    assert ("no KV progress" in error.details() and "2 s" in error.details()) or \
        "timed out reading" in error.details()
    assert (pl.blocks_used, dl.blocks_used) == (0, 0)


def test_proxy_layerwise_with_the_openai_client(cluster):
    proxy, url = start_proxy("--prefill", cluster.p_addr, "--decode", cluster.d_addr,
                             "--kv-transfer-mode", "layerwise")
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
        for stream in (False, True):
            got = _completion(client, stream)
            expected = cluster.llm.generate({"prompt": LONG[:400]},
                                            SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
            assert got == expected[0].outputs[0].text, f"stream={stream}"
        assert "instead" not in _log(proxy)  # layer-wise throughout, no fallback to the whole-KV round
    finally:
        stop(proxy)
    pl, dl = asyncio.run(_settled(cluster))
    assert (pl.blocks_used, dl.blocks_used) == (0, 0)


def _completion(client, stream: bool) -> str:
    kw = dict(model=client.models.list().data[0].id, prompt=LONG[:400], max_tokens=10, temperature=0,
              extra_body={"ignore_eos": True})
    if not stream:
        return client.completions.create(**kw).choices[0].text
    return "".join(chunk.choices[0].text for chunk in client.completions.create(**kw, stream=True)
                   if chunk.choices)


def test_prefill_killed_mid_stream_fails_decode_and_frees_it(cluster):
    cluster.read_before = _read_before(cluster)

    async def scenario():
        (p, d), stream, decoding, first, result = await _start_streaming(cluster, "kp1", p_addr=cluster.vp_addr)
        cluster.vp.kill()
        cluster.vp.wait(timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await asyncio.wait_for(first, 20)
        result.cancel()
        await asyncio.gather(result, return_exceptions=True)
        await decoding.aclose()
        for inst in (p, d):
            await inst.channel.close()
        return err.value

    error = asyncio.run(scenario())
    assert error.code() == grpc.StatusCode.UNAVAILABLE and "prefill" in error.details()
    pl, dl = asyncio.run(_settled(cluster))  # decode's blocks; the dead prefill's went with it
    assert (pl.blocks_used, dl.blocks_used) == (0, 0)

"""Prefill and decode as real processes, real gRPC, real Mooncake over TCP on loopback."""
import asyncio
import dataclasses
import os
import signal
import time

import grpc
import numpy as np
import pytest
from PIL import Image

from qwenvl_pd import LLM, SamplingParams
from qwenvl_pd.messages import MediaItem, PrefillRequest
from qwenvl_pd.proxy.cluster import pd_client
from qwenvl_pd.proxy.cluster.instance import Instance
from qwenvl_pd.serve import grpc_serving

from nodes import Spares, free_port, pd_backend, pd_generate, pd_pair, png_bytes, run_backend, spawn_node, stop, \
    wait_healthy

IMG = "<|vision_start|><|image_pad|><|vision_end|>"


def _image(w, h, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def _chat(body):
    return f"<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\n"


def _pd_request(llm: LLM, rid: str, request: dict, params: SamplingParams) -> PrefillRequest:
    """What the proxy sends: expanded ids, raw image bytes, grids."""
    images = (request.get("multi_modal_data") or {}).get("image", [])
    raw = [png_bytes(im) for im in images]
    prompt = llm.inputs.process({**request, "multi_modal_data": {"image": raw} if raw else {}})
    media = tuple(MediaItem(kind="image", content_hash=it.content_hash, grid_thw=it.grid_thw, data=b)
                  for it, b in zip(prompt.items, raw))
    return PrefillRequest(request_id=rid, prompt_token_ids=tuple(prompt.token_ids), media=media,
                          sampling=params)


async def _run(p_addr, d_addr, req: PrefillRequest) -> tuple[list[int], str]:
    return await pd_generate(p_addr, d_addr, req)


async def _loads(p_addr, d_addr):
    p, d = Instance.connect("prefill", p_addr), Instance.connect("decode", d_addr)
    out = await pd_client.load(p, "prefill"), await pd_client.load(d, "decode")
    await p.channel.close()
    await d.channel.close()
    return out


async def _settled_loads(p_addr, d_addr, timeout=20):
    deadline = time.monotonic() + timeout
    while True:
        pl, dl = await _loads(p_addr, d_addr)
        if (pl.blocks_used, dl.blocks_used) == (0, 0) or time.monotonic() > deadline:
            return pl, dl
        await asyncio.sleep(0.2)


# name -> (role, extra args): the nodes single tests start (each is used once), spawned with the
# shared pair; start-up is most of this file's time, and one start-up leaves a core idle
SPARES = {"block_size_32": ("decode", ("--block-size", "32")), "sigterm": ("decode", ()),
          "drain": ("prefill", ("--drain-seconds", "20")),
          "allowed": ("decode", ("--allowed-prefills", "10.255.255.1")), "victim": ("decode", ()),
          "retry_prefill": ("prefill", ()), "retry_decode": ("decode", ()),
          "queue": ("prefill", ("--max-queued-requests", "1", "--max-num-seqs", "1")),
          # 0.0001 GiB holds 4 blocks of the tiny model: 64 tokens, far below max_model_len 2048
          "pool_too_small": ("prefill", ("--kv-cache-gib", "0.0001"))}


@pytest.fixture(scope="module")
def spares(tiny_dirs):
    model = str(tiny_dirs["qwen2_5_vl"])
    nodes = Spares({name: (role, model, extra) for name, (role, extra) in SPARES.items()})
    try:
        yield nodes
    finally:
        nodes.stop()


@pytest.fixture(scope="module")
def shared(tiny_dirs, spares):
    """One prefill and one decode for the fault tests; the test that kills the prefill runs last."""
    model = str(tiny_dirs["qwen2_5_vl"])
    with pd_pair(model, prefill_args=("--lease-seconds", "4", "--transfer-timeout", "2")) as (p, d):
        yield LLM(model=model, max_model_len=2048), model, p, d


def test_64_concurrent_requests_then_zero_blocks(shared):
    llm, _, (_, p_addr), (_, d_addr) = shared
    reqs = [_pd_request(llm, f"c{i}", {"prompt": _chat((IMG if i % 3 == 0 else "") + f"number {i} " * (1 + i % 5)),
                                       "multi_modal_data": {"image": [_image(56 + i, 56, i)]} if i % 3 == 0 else {}},
                        SamplingParams(max_tokens=4 + i % 9, temperature=0, ignore_eos=True))
            for i in range(64)]

    async def run_all():
        return await asyncio.gather(*(_run(p_addr, d_addr, r) for r in reqs))

    results = asyncio.run(run_all())
    assert [len(t) for t, _ in results] == [4 + i % 9 for i in range(64)]
    assert all(reason == "length" for _, reason in results)
    pl, dl = asyncio.run(_settled_loads(p_addr, d_addr))
    assert (pl.blocks_used, dl.blocks_used, pl.running, dl.running) == (0, 0, 0, 0)



async def _decode_refused(p_addr, d_addr, req, edit):
    """Prefill req, hand edit(result) to decode, which must fail; abort; both loads after."""
    p, d = Instance.connect("prefill", p_addr), Instance.connect("decode", d_addr)
    result = edit(await pd_client.prefill(p, req))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in pd_client.decode(d, pd_client.decode_request(req, result)):
            pass
    await pd_client.abort(p, "prefill", req.request_id)
    await p.channel.close()
    await d.channel.close()
    # an aborted lease's blocks are freed at the engine's next step boundary, not before Abort answers
    return err.value, await _settled_loads(p_addr, d_addr)


def test_fingerprint_mismatch_names_the_field(shared, spares):
    llm, _, (_, p_addr), _ = shared
    other, other_addr = spares.take("block_size_32")
    req = _pd_request(llm, "f1", {"prompt": _chat("hi")}, SamplingParams(max_tokens=8, temperature=0))

    try:
        error, (pl, dl) = asyncio.run(_decode_refused(p_addr, other_addr, req, lambda r: r))
    finally:
        stop(other)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "block_size: prefill 16, decode 32" in error.details()
    assert (pl.blocks_used, dl.blocks_used) == (0, 0)


def test_a_handle_from_another_instance_is_never_trusted(shared):
    llm, _, (_, p_addr), (_, d_addr) = shared
    req = _pd_request(llm, "s1", {"prompt": _chat("stale handle")},
                      SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))

    def stale(result):  # what a handle minted by an earlier process at the same address looks like
        return dataclasses.replace(result, handle=dataclasses.replace(result.handle, instance_id="prefill-old"))

    error, (pl, dl) = asyncio.run(_decode_refused(p_addr, d_addr, req, stale))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "on prefill prefill-old was no longer held" in error.details()
    assert (pl.blocks_used, dl.blocks_used) == (0, 0)


def test_a_release_that_fails_is_not_taken_as_a_held_lease(shared):
    llm, _, (_, p_addr), (_, d_addr) = shared
    req = _pd_request(llm, "r1", {"prompt": _chat("release fails")},
                      SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    closed = f"127.0.0.1:{free_port()}"  # nothing listens: Release cannot confirm the lease

    def unconfirmable(result):
        return dataclasses.replace(result, handle=dataclasses.replace(result.handle, control_address=closed))

    error, (pl, dl) = asyncio.run(_decode_refused(p_addr, d_addr, req, unconfirmable))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert f"could not be confirmed (Release at {closed}: UNAVAILABLE)" in error.details()
    assert (pl.blocks_used, dl.blocks_used) == (0, 0)


def test_abort_during_transfer_frees_both_sides(shared):
    llm, _, (p_proc, p_addr), (_, d_addr) = shared
    req = _pd_request(llm, "a1", {"prompt": _chat("hello " * 60)},
                      SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))

    async def scenario():
        p, d = Instance.connect("prefill", p_addr), Instance.connect("decode", d_addr)
        result = await pd_client.prefill(p, req)
        events = []

        async def consume():
            async for ev in pd_client.decode(d, pd_client.decode_request(req, result)):
                events.append(ev)

        os.kill(p_proc.pid, signal.SIGSTOP)  # the read now hangs inside Mooncake
        try:
            task = asyncio.ensure_future(consume())
            deadline = time.monotonic() + 20  # until decode holds the blocks the read writes to
            while (await pd_client.load(d, "decode")).blocks_used == 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)
            found = await pd_client.abort(d, "decode", req.request_id)
            held_during = (await pd_client.load(d, "decode")).blocks_used
        finally:
            os.kill(p_proc.pid, signal.SIGCONT)
        await asyncio.wait_for(task, timeout=30)
        await pd_client.abort(p, "prefill", req.request_id)
        await p.channel.close()
        await d.channel.close()
        return found, held_during, events

    found, held_during, events = asyncio.run(scenario())
    assert found
    assert held_during > 0  # the blocks stay with the read until it returns
    assert [e.finish_reason for e in events] == ["abort"]
    pl, dl = asyncio.run(_settled_loads(p_addr, d_addr))
    assert (pl.blocks_used, dl.blocks_used) == (0, 0)


def test_decode_streams_cancelled_at_any_moment_leave_no_block_behind(shared):
    # cancellation lands in the allocation, the pull, the Release or the join, depending on
    # the delay: every one of those exits must hand its blocks back
    llm, _, (_, p_addr), (_, d_addr) = shared
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    reqs = [_pd_request(llm, f"c{i}", {"prompt": _chat(f"cancel me {i} " * 8)}, params) for i in range(24)]

    async def scenario():
        p, d = Instance.connect("prefill", p_addr), Instance.connect("decode", d_addr)
        results = [await pd_client.prefill(p, r) for r in reqs]

        async def consume(req, result):
            async for _ in pd_client.decode(d, pd_client.decode_request(req, result)):
                pass

        for i, (req, result) in enumerate(zip(reqs, results)):
            task = asyncio.ensure_future(consume(req, result))
            await asyncio.sleep(i * 0.0005)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        for req in reqs:  # leases decode never released
            await pd_client.abort(p, "prefill", req.request_id)
        await p.channel.close()
        await d.channel.close()

    asyncio.run(scenario())
    pl, dl = asyncio.run(_settled_loads(p_addr, d_addr))
    assert (pl.blocks_used, dl.blocks_used, dl.running) == (0, 0, 0)



def test_sigterm_drains_a_running_stream_then_exits_0(shared, spares):
    llm, _, (_, p_addr), _ = shared
    node, addr = spares.take("sigterm")
    req = _pd_request(llm, "t1", {"prompt": _chat("drain me")},
                      SamplingParams(max_tokens=300, temperature=0, ignore_eos=True))

    async def scenario():
        p, d = Instance.connect("prefill", p_addr), Instance.connect("decode", addr)
        result = await pd_client.prefill(p, req)
        events, serving = [], None
        async for ev in pd_client.decode(d, pd_client.decode_request(req, result)):
            events.append(ev)
            if len(events) == 3:
                node.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.5)
                serving = await asyncio.to_thread(grpc_serving, addr)
        await p.channel.close()
        await d.channel.close()
        return events, serving

    try:
        events, serving = asyncio.run(scenario())
        assert serving is False  # NOT_SERVING at once: the proxy routes elsewhere
        assert events[-1].finish_reason == "length" and events[-1].num_output_tokens == 300
        assert node.wait(timeout=30) == 0
    finally:
        stop(node)

def test_a_draining_prefill_keeps_serving_the_kv_it_leased_then_exits_0(shared, spares):
    llm, _, _, (_, d_addr) = shared
    node, addr = spares.take("drain")
    req = _pd_request(llm, "dr1", {"prompt": _chat("lease me " * 30)},
                      SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    expected = llm.generate({"prompt": _chat("lease me " * 30)},
                            SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0].outputs[0].token_ids

    async def scenario():
        p, d = Instance.connect("prefill", addr), Instance.connect("decode", d_addr)
        result = await pd_client.prefill(p, req)
        node.send_signal(signal.SIGTERM)  # the lease is held; decode has not read it yet
        await asyncio.sleep(1.0)
        refused = None
        try:
            await pd_client.prefill(p, dataclasses.replace(req, request_id="dr2"))
        except grpc.aio.AioRpcError as e:
            refused = (e.code(), "draining" in e.details())
        tokens = [result.first_token.token_id]
        async for ev in pd_client.decode(d, pd_client.decode_request(req, result)):
            tokens += [ev.token.token_id] if ev.token else []
        await p.channel.close()
        await d.channel.close()
        return refused, tokens

    try:
        refused, tokens = asyncio.run(scenario())
        assert refused == (grpc.StatusCode.UNAVAILABLE, True)
        assert tokens == list(expected)  # read from the draining prefill, after its SIGTERM
        started = time.monotonic()
        assert node.wait(timeout=15) == 0  # exits once decode released the lease, not at 20 s
        assert time.monotonic() - started < 10
    finally:
        stop(node)


def test_a_decode_with_allowed_prefills_reads_from_no_other_address(shared, spares):
    llm, _, (_, p_addr), _ = shared
    node, addr = spares.take("allowed")
    req = _pd_request(llm, "al1", {"prompt": _chat("whose KV is this?")},
                      SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))

    async def scenario():
        p, d = Instance.connect("prefill", p_addr), Instance.connect("decode", addr)
        result = await pd_client.prefill(p, req)
        try:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async for _ in pd_client.decode(d, pd_client.decode_request(req, result)):
                    pass
            return refused.value, (await pd_client.load(d, "decode")).blocks_used
        finally:
            await pd_client.abort(p, "prefill", req.request_id)
            await p.channel.close()
            await d.channel.close()

    try:
        refused, blocks = asyncio.run(scenario())
        assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "not a prefill this decode reads from (--allowed-prefills 10.255.255.1)" in refused.details()
        assert blocks == 0  # refused before any block was reserved or read
    finally:
        stop(node)


def test_decode_killed_mid_transfer_lease_frees_prefill_blocks(shared, spares):
    llm, _, (p_proc, p_addr), _ = shared
    victim, victim_addr = spares.take("victim")
    req = _pd_request(llm, "k1", {"prompt": _chat("hello " * 40)},
                      SamplingParams(max_tokens=500, temperature=0, ignore_eos=True))

    async def scenario():
        p, d = Instance.connect("prefill", p_addr), Instance.connect("decode", victim_addr)
        result = await pd_client.prefill(p, req)
        held = (await pd_client.load(p, "prefill")).blocks_used
        os.kill(p_proc.pid, signal.SIGSTOP)  # decode's pull hangs: no Release will come
        try:
            stream = pd_client.decode(d, pd_client.decode_request(req, result))
            task = asyncio.ensure_future(stream.__anext__())
            await asyncio.sleep(1.0)
            victim.kill()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await asyncio.wait_for(task, timeout=30)
        finally:
            os.kill(p_proc.pid, signal.SIGCONT)
        deadline = time.monotonic() + 15
        while (await pd_client.load(p, "prefill")).blocks_used and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        after = (await pd_client.load(p, "prefill")).blocks_used
        await p.channel.close()
        await d.channel.close()
        return result, held, err.value, after

    try:
        result, held, error, after = asyncio.run(scenario())
    finally:
        stop(victim)
    assert held == len(result.handle.block_ids) > 0
    assert error.code() == grpc.StatusCode.UNAVAILABLE  # the client sees the stream end in error
    assert after == 0


def test_pd_backend_retries_a_dead_prefill_and_a_dead_decode_on_the_live_ones(shared, spares):
    """The proxy's own retries with real processes: a prefill and a decode that die after the
    health round (their calls fail UNAVAILABLE) hand the request to the live ones and leave
    rotation. The first request prefers the dead prefill; the two requests take both decodes."""
    llm, _, (_, p_addr), (_, d_addr) = shared
    (vp, vp_addr), (vd, vd_addr) = spares.take("retry_prefill"), spares.take("retry_decode")
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    prompts = [{"prompt": _chat(f"retry number {i}")} for i in range(2)]

    async def scenario():
        async with pd_backend([p_addr, vp_addr], [d_addr, vd_addr]) as backend:
            for proc in (vp, vd):
                proc.kill()
                proc.wait(timeout=10)
            key = next(k for k in (b"%d" % i for i in range(64)) if backend.router.pick_prefill(k).address == vp_addr)
            got = [await run_backend(backend, _pd_request(llm, f"rt{i}", r, sp), key) for i, r in enumerate(prompts)]
            healthy = [[s.address for s in backend.router.healthy(role)] for role in ("prefill", "decode")]
            return got, healthy
    try:
        got, healthy = asyncio.run(scenario())
    finally:
        stop(vp)
        stop(vd)
    assert got == [(list(llm.generate(r, sp)[0].outputs[0].token_ids), "length") for r in prompts]
    assert healthy == [[p_addr], [d_addr]]


def test_prefill_killed_after_answering_decode_fails_cleanly(shared):
    llm, _, (p_proc, p_addr), (_, d_addr) = shared
    req = _pd_request(llm, "k2", {"prompt": _chat("hello " * 40)},
                      SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))

    async def scenario():
        p, d = Instance.connect("prefill", p_addr), Instance.connect("decode", d_addr)
        result = await pd_client.prefill(p, req)
        p_proc.kill()
        p_proc.wait(timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in pd_client.decode(d, pd_client.decode_request(req, result)):
                pass
        used = (await pd_client.load(d, "decode")).blocks_used
        await p.channel.close()
        await d.channel.close()
        return err.value, used

    error, used = asyncio.run(scenario())
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "KV read from prefill" in error.details()
    assert used == 0


def test_a_full_waiting_queue_refuses_with_resource_exhausted(shared, spares):
    llm = shared[0]
    proc, addr = spares.take("queue")
    reqs = [_pd_request(llm, f"q{i}", {"prompt": _chat("word " * 300)},
                        SamplingParams(max_tokens=4, temperature=0)) for i in range(8)]

    async def scenario():
        inst = Instance.connect("prefill", addr)
        outcomes = await asyncio.gather(*(pd_client.prefill(inst, r) for r in reqs), return_exceptions=True)
        for r, out in zip(reqs, outcomes):
            if not isinstance(out, Exception):
                await pd_client.abort(inst, "prefill", r.request_id)
        used = (await pd_client.load(inst, "prefill")).blocks_used
        await inst.channel.close()
        return outcomes, used
    try:
        outcomes, used = asyncio.run(scenario())
    finally:
        stop(proc)
    refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert refused and len(refused) < len(reqs)  # the running one and the one waiting got through
    assert {e.code() for e in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert "requests waiting (--max-queued-requests 1)" in refused[0].details()
    assert used == 0


def test_a_pool_smaller_than_max_model_len_refuses_to_start(spares):
    proc, _ = spares.nodes["pool_too_small"]  # --max-model-len 2048, --kv-cache-gib 0.0001
    assert proc.wait(timeout=120) == 1
    proc.log.seek(0)
    assert ("the KV pool holds 64 tokens (4 blocks), less than max_model_len 2048: raise --kv-cache-gib "
            "or lower --max-model-len") in proc.log.read()


def test_with_the_cluster_secret_unsigned_calls_and_handles_are_refused(shared, tmp_path):
    llm, model, _, _ = shared
    secret = tmp_path / "secret"
    secret.write_text("s3cret-of-this-cluster\n")
    with pd_pair(model, ("--cluster-secret-file", str(secret)), ("--cluster-secret-file", str(secret))) as (
            (_, p_addr), (_, d_addr)):
        req = _pd_request(llm, "auth1", {"prompt": _chat("who may call?")},
                          SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
        key = b"s3cret-of-this-cluster"

        async def scenario():
            bare, p, d = (Instance.connect("prefill", p_addr), Instance.connect("prefill", p_addr, key),
                          Instance.connect("decode", d_addr, key))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await pd_client.prefill(bare, req)
            result = await pd_client.prefill(p, req)
            # another request's blocks, as someone who can reach decode's port might ask for
            other = tuple(b + 1 for b in result.handle.block_ids)
            forged = dataclasses.replace(result, handle=dataclasses.replace(result.handle, block_ids=other))
            with pytest.raises(grpc.aio.AioRpcError) as unsigned:
                async for _ in pd_client.decode(d, pd_client.decode_request(req, forged)):
                    pass
            # the signed handle paired with another request of the same length
            with pytest.raises(grpc.aio.AioRpcError) as paired:
                async for _ in pd_client.decode(d, pd_client.decode_request(
                        dataclasses.replace(req, request_id="auth2"), result)):
                    pass
            events = [ev async for ev in pd_client.decode(d, pd_client.decode_request(req, result))]
            for inst in (bare, p, d):
                await inst.channel.close()
            return refused.value, unsigned.value, events, paired.value

        refused, unsigned, events, paired = asyncio.run(scenario())
        assert paired.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "issued for request 'auth1', not 'auth2'" in paired.details()
        assert refused.code() == grpc.StatusCode.UNAUTHENTICATED and "cluster secret" in refused.details()
        assert unsigned.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "was not signed by a prefill of this cluster" in unsigned.details()
        assert events[-1].finish_reason == "length"  # the signed handle decodes
        assert grpc_serving(p_addr) and grpc_serving(d_addr)  # health stays open for kubelet


def test_w8a8_through_pd_equals_offline_and_refuses_a_float_decode(tiny_dirs, tmp_path_factory):
    from qwenvl_pd.model.tiny import make_tiny
    model = str(make_tiny("qwen3_vl_moe", tmp_path_factory.mktemp("pd_w8a8") / "m", quantize="w8a8"))
    llm = LLM(model=model, max_model_len=2048)
    greedy = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    requests = [{"prompt": _chat(f"{IMG}What is this?"), "multi_modal_data": {"image": [_image(90, 70, 1)]}},
                {"prompt": _chat("Tell me a story about the sea.")}]
    # same config.json, float weights: only the quantisation tells the KV apart (loads meanwhile)
    other, other_addr = spawn_node("decode", str(tiny_dirs["qwen3_vl_moe"]))
    try:
        with pd_pair(model, decode_args=("--quantization", "ascend")) as ((_, p_addr), (_, d_addr)):
            for i, req in enumerate(requests):
                tokens, _ = asyncio.run(_run(p_addr, d_addr, _pd_request(llm, f"q{i}", req, greedy)))
                assert tokens == llm.generate(req, greedy)[0].outputs[0].token_ids
            wait_healthy(other_addr, other)
            error, _ = asyncio.run(_decode_refused(p_addr, other_addr, _pd_request(llm, "q9", requests[1], greedy),
                                                   lambda r: r))
    finally:
        stop(other)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "quantization: prefill ascend-w8a8:" in error.details() and ", decode none" in error.details()

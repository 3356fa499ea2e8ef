"""PD across tensor-parallel sizes (gloo on CPU, Mooncake TCP on loopback) gives the colocated
engine's tokens, greedy and seeded, on all three families; faults on a rank leave both pools whole.

Each family's checkpoint has two layers, and one cluster of P1, P2, D1, D2 serves its pairs (1, 1),
(1, 2), (2, 1), (2, 2). Qwen2.5-VL's has two KV heads (split at TP 2: decode reads different heads
from different prefill ranks), the Qwen3-VL ones one (replicated at TP 2). The next cluster
starts while one serves: start-up is most of this file's time.
"""
from __future__ import annotations

import asyncio
import os
import signal

import grpc
import pytest

from qwenvl_pd import LLM, SamplingParams
from qwenvl_pd.model.tiny import make_tiny
from qwenvl_pd.proxy.cluster import pd_client
from qwenvl_pd.proxy.cluster.instance import Instance
from qwenvl_pd.protos import qwenvl_pd_pb2 as pb, qwenvl_pd_pb2_grpc as pb_grpc

from nodes import pd_generate, rank_children, spawn_node, stop, wait_healthy
from test_pd import IMG, _chat, _image, _pd_request, _run, _settled_loads

ALL_PAIRS = [(1, 1), (1, 2), (2, 1), (2, 2)]
ONE_KV_HEAD = {"num_key_value_heads": 1, "num_hidden_layers": 2}
# name -> (arch, text overrides, (prefill TP, decode TP) pairs), in the order the tests use them
CHECKPOINTS = {
    "qwen2_5_vl": ("qwen2_5_vl", {"num_hidden_layers": 2}, ALL_PAIRS),  # two KV heads: split at TP 2
    "qwen3_vl": ("qwen3_vl", ONE_KV_HEAD, ALL_PAIRS),
    "qwen3_vl_moe": ("qwen3_vl_moe", ONE_KV_HEAD, ALL_PAIRS),
}
NODE_ARGS = ("--lease-seconds", "6", "--transfer-timeout", "2", "--kv-layer-group", "1")
REQUESTS = [{"prompt": _chat(f"{IMG}What is this?"), "multi_modal_data": {"image": [_image(90, 70, 1)]}},
            {"prompt": _chat(f"{IMG}{IMG}Compare."),
             "multi_modal_data": {"image": [_image(60, 120, 2), _image(130, 50, 3)]}},
            {"prompt": _chat("Tell me a story about the sea.")}]
PARAMS = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
          SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True)]


class Cluster:
    """The prefill and decode instances one checkpoint's pairs need, keyed (role, TP size);
    spawned at construction, waited for by ready()."""

    def __init__(self, model: str, pairs: list[tuple[int, int]]):
        self.model, self.pairs, self.nodes = model, pairs, {}
        sizes = {("prefill", p) for p, _ in pairs} | {("decode", d) for _, d in pairs}
        for role, tp in sorted(sizes):
            self.nodes[role, tp] = spawn_node(role, model, "--tensor-parallel-size", str(tp), *NODE_ARGS)

    def ready(self) -> Cluster:
        try:
            for proc, address in self.nodes.values():
                wait_healthy(address, proc)
        except BaseException:
            self.stop()
            raise
        return self

    def address(self, role: str, tp: int) -> str:
        return self.nodes[role, tp][1]

    def stop(self) -> None:
        for proc, _ in self.nodes.values():  # all shut down at once, then each is waited for
            if proc.poll() is None:
                proc.terminate()
        for proc, _ in self.nodes.values():
            stop(proc)


@pytest.fixture(scope="module")
def cluster_of(tmp_path_factory):
    """name -> its running Cluster. Asking for one stops those before it and spawns the next."""
    names, spawned = list(CHECKPOINTS), {}

    def spawn(name: str) -> Cluster:
        if name not in spawned:
            arch, over, pairs = CHECKPOINTS[name]
            model = str(make_tiny(arch, tmp_path_factory.mktemp(name) / "tiny", text_overrides=over))
            spawned[name] = Cluster(model, pairs)
        return spawned[name]

    def get(name: str) -> Cluster:
        for earlier in names[:names.index(name)]:
            if earlier in spawned:
                spawned.pop(earlier).stop()
        cluster = spawn(name).ready()
        if name != names[-1]:
            spawn(names[names.index(name) + 1])
        return cluster

    yield get
    for c in spawned.values():
        c.stop()


def test_a_prefill_rank_hanging_mid_pull_fails_the_request_and_frees_both_pools(cluster_of):
    """P2 -> D1 with 2 KV heads: decode reads prefill rank 0, then rank 1, which is stopped; the
    read times out, decode frees its blocks once the late read settles, prefill's lease ends."""
    cluster = cluster_of("qwen2_5_vl")
    (p_proc, p_addr), d_addr = cluster.nodes["prefill", 2], cluster.address("decode", 1)
    llm = LLM(model=cluster.model, max_model_len=2048)
    req = _pd_request(llm, "hang-1", {"prompt": _chat("hello " * 40)},
                      SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    llm.close()
    rank1, = rank_children(p_proc.pid)
    error = asyncio.run(_decode_with_rank_stopped(p_addr, d_addr, req, rank1))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "KV read from prefill" in error.details() and "timed out reading" in error.details()
    pl, dl = asyncio.run(_settled_loads(p_addr, d_addr, timeout=30))
    assert (pl.blocks_used, dl.blocks_used, pl.running, dl.running) == (0, 0, 0, 0)


async def _decode_with_rank_stopped(p_addr: str, d_addr: str, req, pid: int) -> grpc.aio.AioRpcError:
    p, d = Instance.connect("prefill", p_addr), Instance.connect("decode", d_addr)
    result = await pd_client.prefill(p, req)
    os.kill(pid, signal.SIGSTOP)  # its transfer engine stops answering: the read hangs
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in pd_client.decode(d, pd_client.decode_request(req, result)):
                pass
    finally:
        os.kill(pid, signal.SIGCONT)
    await pd_client.abort(p, "prefill", req.request_id)
    await p.channel.close()
    await d.channel.close()
    return err.value


def test_release_answers_while_the_engine_is_mid_step(cluster_of):
    """Release ends a lease without waiting for the step under way: here prefill rank 1 is
    stopped, so rank 0's next step cannot end; a Release that waited for it would time out
    and decode would throw the read away."""
    cluster = cluster_of("qwen2_5_vl")
    p_proc, p_addr = cluster.nodes["prefill", 2]
    llm = LLM(model=cluster.model, max_model_len=2048)
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    held, stuck = (_pd_request(llm, rid, {"prompt": _chat(f"{rid} " * 30)}, sp) for rid in ("held", "stuck"))
    llm.close()
    rank1, = rank_children(p_proc.pid)
    released = asyncio.run(_release_during_a_stopped_step(p_addr, held, stuck, rank1))
    assert released
    pl, _ = asyncio.run(_settled_loads(p_addr, cluster.address("decode", 1), timeout=30))
    assert (pl.blocks_used, pl.running) == (0, 0)


async def _release_during_a_stopped_step(p_addr: str, held, stuck, rank1: int) -> bool:
    p = Instance.connect("prefill", p_addr)
    result = await pd_client.prefill(p, held)  # its blocks now sit under a lease
    os.kill(rank1, signal.SIGSTOP)
    try:
        step = asyncio.create_task(pd_client.prefill(p, stuck))  # its step waits on rank 1
        await asyncio.sleep(1.0)
        reply = await pb_grpc.PrefillStub(p.channel).Release(
            pb.ReleaseRequest(request_id=held.request_id, instance_id=result.handle.instance_id), timeout=3)
    finally:
        os.kill(rank1, signal.SIGCONT)
    await step  # the step ends once rank 1 runs again; its lease goes with the abort
    await pd_client.abort(p, "prefill", stuck.request_id)
    await p.channel.close()
    return reply.released


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_pd_across_tp_sizes_equals_colocated_greedy_and_seeded(cluster_of, name):
    """Every pair greedy and seeded, the requests in turn over the pairs (each runs on some pair);
    layer-wise once per pair, greedy."""
    cluster = cluster_of(name)
    llm = LLM(model=cluster.model, max_model_len=2048)  # the colocated engine, TP 1
    n = max(len(cluster.pairs), len(REQUESTS))
    runs = [(cluster.pairs[t % len(cluster.pairs)], t % len(REQUESTS)) for t in range(n)]
    for (p_tp, d_tp), i in runs:
        p_addr, d_addr = cluster.address("prefill", p_tp), cluster.address("decode", d_tp)
        for j, sp in enumerate(PARAMS):
            expected = llm.generate(REQUESTS[i], sp)[0].outputs[0].token_ids
            rid = f"{name}-{p_tp}{d_tp}-{i}-{j}"
            tokens, reason = asyncio.run(_run(p_addr, d_addr, _pd_request(llm, rid, REQUESTS[i], sp)))
            assert (tokens, reason) == (expected, "length"), f"P{p_tp} D{d_tp} request {i} params {j}"
            if j == 0:  # a TP decode's rank-0 job carries each read's layer range to every rank
                req = _pd_request(llm, rid + "-lw", REQUESTS[i], sp)
                tokens, reason = asyncio.run(_run_layerwise(p_addr, d_addr, req))
                assert (tokens, reason) == (expected, "length"), f"layer-wise P{p_tp} D{d_tp} request {i}"
        pl, dl = asyncio.run(_settled_loads(p_addr, d_addr))
        assert (pl.blocks_used, dl.blocks_used, dl.running) == (0, 0, 0)
    llm.close()


async def _run_layerwise(p_addr: str, d_addr: str, req) -> tuple[list[int], str]:
    return await pd_generate(p_addr, d_addr, req, layerwise=True)


def test_a_tp_decodes_pull_from_a_healthy_prefill_passes_one_stuck_on_a_hung_prefill(cluster_of):
    """D2 pulls request X from P2, which is stopped (its read hangs), then Y from P1: Y streams to
    its end while X is still stuck (pulls used to queue behind one lock on the ranks' group)."""
    cluster = cluster_of(list(CHECKPOINTS)[-1])
    (hung_proc, hung_addr), p_addr = cluster.nodes["prefill", 2], cluster.address("prefill", 1)
    d_addr = cluster.address("decode", 2)
    llm = LLM(model=cluster.model, max_model_len=2048)
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    x, y, warm_x, warm_y = (_pd_request(llm, rid, {"prompt": _chat(f"pull {rid} " * 20)}, greedy)
                            for rid in ("px", "py", "wx", "wy"))
    llm.close()
    # decode has read from both before: Mooncake's first contact with a peer (its handshake)
    # blocks the engine's other first contacts, a limit of Mooncake's, not of the pulls
    for prefill, warm in ((hung_addr, warm_x), (p_addr, warm_y)):
        assert asyncio.run(_run(prefill, d_addr, warm))[1] == "length"
    pids = [hung_proc.pid, *rank_children(hung_proc.pid)]
    y_reason, x_running, x_code = asyncio.run(_pull_past_a_hung_prefill(hung_addr, p_addr, d_addr, x, y, pids))
    assert (y_reason, x_running) == ("length", True)
    assert x_code == grpc.StatusCode.UNAVAILABLE
    for prefill in (hung_addr, p_addr):
        pl, dl = asyncio.run(_settled_loads(prefill, d_addr, timeout=30))
        assert (pl.blocks_used, dl.blocks_used, dl.running) == (0, 0, 0)


async def _pull_past_a_hung_prefill(hung_addr, p_addr, d_addr, x, y, pids):
    hung, p, d = (Instance.connect(role, a) for role, a in (("prefill", hung_addr), ("prefill", p_addr),
                                                              ("decode", d_addr)))
    x_result, y_result = await pd_client.prefill(hung, x), await pd_client.prefill(p, y)

    async def decode(req, result):
        reason = ""
        async for event in pd_client.decode(d, pd_client.decode_request(req, result)):
            reason = event.finish_reason or reason
        return reason

    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        x_task = asyncio.ensure_future(decode(x, x_result))
        await asyncio.sleep(0.5)  # X's pull is posted to every rank and hangs there
        y_reason = await decode(y, y_result)
        x_running = not x_task.done()
        with pytest.raises(grpc.aio.AioRpcError) as x_error:  # still stopped: X's read times out
            await x_task
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    await pd_client.abort(hung, "prefill", x.request_id)
    for inst in (hung, p, d):
        await inst.channel.close()
    return y_reason, x_running, x_error.value.code()


def test_a_decode_rank_killed_mid_stream_ends_the_stream_and_the_instance(cluster_of):
    """The last cluster's D2 loses its rank 1 mid-stream: the stream fails with a status, the
    instance exits non-zero, and prefill's lease is freed all the same."""
    cluster = cluster_of(list(CHECKPOINTS)[-1])
    p_addr, (d_proc, d_addr) = cluster.address("prefill", 1), cluster.nodes["decode", 2]
    llm = LLM(model=cluster.model, max_model_len=2048)
    req = _pd_request(llm, "kill-1", {"prompt": _chat("a long answer")},
                      SamplingParams(max_tokens=1500, temperature=0, ignore_eos=True))
    llm.close()
    rank1, = rank_children(d_proc.pid)
    error, received = asyncio.run(_decode_with_rank_killed(p_addr, d_addr, req, rank1))
    assert received >= 3 and error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL)
    assert d_proc.wait(timeout=30) == 1
    pl, _ = asyncio.run(_settled_loads(p_addr, cluster.address("decode", 1)))
    assert (pl.blocks_used, pl.running) == (0, 0)


async def _decode_with_rank_killed(p_addr: str, d_addr: str, req, pid: int) -> tuple[grpc.aio.AioRpcError, int]:
    p, d = Instance.connect("prefill", p_addr), Instance.connect("decode", d_addr)
    result, received = await pd_client.prefill(p, req), 0
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in pd_client.decode(d, pd_client.decode_request(req, result)):
            received += 1
            if received == 3:  # mid-stream: decode has joined and streams
                os.kill(pid, signal.SIGKILL)
    await p.channel.close()
    await d.channel.close()
    return err.value, received


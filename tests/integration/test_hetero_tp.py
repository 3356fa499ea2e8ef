"""Heterogeneous TP: prefill and decode instances of different tensor-parallel sizes (gloo on CPU,
Mooncake TCP on loopback) give the colocated engine's tokens, greedy and seeded; a prefill rank
that hangs mid-pull leaves both pools whole.

Each family runs once with a pair that splits KV heads differently on the two sides, and a
checkpoint with one KV head (replicated at TP 2) runs (1, 2), (2, 1) and (2, 2): a TP 2 node
takes ~17 s to start here, so three families x three pairs would be ~4 minutes.
"""
from __future__ import annotations

import asyncio
import os
import signal

import grpc
import pytest

from qwenvl_pd import LLM, SamplingParams
from qwenvl_pd.model.tiny import make_tiny
from qwenvl_pd.proxy import pd_client
from qwenvl_pd.proxy.pd_client import Instance

from nodes import spawn_node, stop, wait_healthy
from test_pd import IMG, _chat, _image, _pd_request, _run, _settled_loads
from test_tensor_parallel import _rank_children

# name -> (arch, text overrides, (prefill TP, decode TP) pairs)
CHECKPOINTS = {
    "qwen2_5_vl": ("qwen2_5_vl", {}, [(2, 1)]),      # 2 KV heads: decode reads both prefill ranks
    "qwen3_vl_moe": ("qwen3_vl_moe", {}, [(1, 2)]),  # each decode rank reads half of every block
    "qwen3_vl_one_kv_head": ("qwen3_vl", {"num_key_value_heads": 1}, [(1, 2), (2, 1), (2, 2)]),
}
NODE_ARGS = ("--lease-seconds", "6", "--transfer-timeout", "2", "--kv-layer-group", "1")
REQUESTS = [{"prompt": _chat(f"{IMG}What is this?"), "multi_modal_data": {"image": [_image(90, 70, 1)]}},
            {"prompt": _chat("Tell me a story about the sea.")}]
PARAMS = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
          SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True)]


class Cluster:
    """The prefill and decode instances one checkpoint's pairs need, keyed (role, TP size)."""

    def __init__(self, model: str, pairs: list[tuple[int, int]]):
        self.model, self.pairs, self.nodes = model, pairs, {}
        sizes = {("prefill", p) for p, _ in pairs} | {("decode", d) for _, d in pairs}
        try:
            for role, tp in sorted(sizes):  # all start at once, then each is waited for
                self.nodes[role, tp] = spawn_node(role, model, "--tensor-parallel-size", str(tp), *NODE_ARGS)
            for proc, address in self.nodes.values():
                wait_healthy(address, proc)
        except BaseException:
            self.stop()
            raise

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
    """name -> its running Cluster; asking for another checkpoint stops the previous one."""
    running: dict[str, Cluster] = {}

    def get(name: str) -> Cluster:
        if name not in running:
            for other in list(running):  # one cluster at a time: two cores, ~1 GB a process
                running.pop(other).stop()
            arch, over, pairs = CHECKPOINTS[name]
            model = str(make_tiny(arch, tmp_path_factory.mktemp(name) / "tiny", text_overrides=over))
            running[name] = Cluster(model, pairs)
        return running[name]

    yield get
    for c in running.values():
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
    rank1, = _rank_children(p_proc.pid)
    error = asyncio.run(_decode_with_rank_stopped(p_addr, d_addr, req, rank1))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "KV read from prefill" in error.details() and "timed out reading" in error.details()
    pl, dl = asyncio.run(_settled_loads(p_addr, d_addr, timeout=30))
    assert (pl.blocks_used, dl.blocks_used, pl.running, dl.running) == (0, 0, 0, 0)


async def _decode_with_rank_stopped(p_addr: str, d_addr: str, req, pid: int) -> grpc.aio.AioRpcError:
    p, d = Instance.connect(p_addr), Instance.connect(d_addr)
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


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_pd_across_tp_sizes_equals_colocated_greedy_and_seeded(cluster_of, name):
    cluster = cluster_of(name)
    llm = LLM(model=cluster.model, max_model_len=2048)  # the colocated engine, TP 1
    expected = [[llm.generate(r, sp)[0].outputs[0].token_ids for sp in PARAMS] for r in REQUESTS]
    for p_tp, d_tp in cluster.pairs:
        p_addr, d_addr = cluster.address("prefill", p_tp), cluster.address("decode", d_tp)
        for i, req in enumerate(REQUESTS):
            for j, sp in enumerate(PARAMS):
                rid = f"{name}-{p_tp}{d_tp}-{i}-{j}"
                tokens, reason = asyncio.run(_run(p_addr, d_addr, _pd_request(llm, rid, req, sp)))
                assert (tokens, reason) == (expected[i][j], "length"), f"P{p_tp} D{d_tp} request {i} params {j}"
                # layer-wise: a TP decode's rank-0 job carries each read's layer range to every rank
                tokens, reason = asyncio.run(_run_layerwise(p_addr, d_addr, _pd_request(llm, rid + "-lw", req, sp)))
                assert (tokens, reason) == (expected[i][j], "length"), f"layer-wise P{p_tp} D{d_tp} {i} {j}"
        pl, dl = asyncio.run(_settled_loads(p_addr, d_addr))
        assert (pl.blocks_used, dl.blocks_used, dl.running) == (0, 0, 0)
    llm.close()


async def _run_layerwise(p_addr: str, d_addr: str, req) -> tuple[list[int], str]:
    p, d = Instance.connect(p_addr), Instance.connect(d_addr)
    tokens, reason = [], ""
    async for result, event in pd_client.generate_layerwise(p, d, req):
        token = result.first_token if event is None else event.token
        tokens += [token.token_id] if token is not None else []
        reason = (result.finish_reason if event is None else event.finish_reason) or reason
    await p.channel.close()
    await d.channel.close()
    return tokens, reason

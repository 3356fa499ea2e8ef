"""PDBackend's failure handling with scripted gRPC hops: prefill retry, 400 passthrough,
re-prefill after a decode preemption, and the lease abort when a client stops early."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from qwenvl_pd.kv_transfer.handle import KVHandle, LayoutFingerprint
from qwenvl_pd.messages import PrefillRequest, PrefillResult, PrefillStreamEvent, SampledToken, TokenEvent
from qwenvl_pd.proxy.cluster import backend as backend_mod
from qwenvl_pd.proxy.cluster.backend import PDBackend
from qwenvl_pd.proxy.errors import APIError
from qwenvl_pd.proxy.metrics import ProxyMetrics
from qwenvl_pd.proxy.cluster.router import Router
from qwenvl_pd.sampling_params import SamplingParams

FP = LayoutFingerprint("m", "float32", 16, 2, 2, 8)


def rpc_error(code, details="boom"):
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


def result(req: PrefillRequest, token: int) -> PrefillResult:
    handle = KVHandle("p", "127.0.0.1:1", 0, 64, 8, (0,), len(req.prompt_token_ids), FP)
    return PrefillResult(req.request_id, SampledToken(token), 0, len(req.prompt_token_ids), handle)


class Script:
    """Fake pd_client: prefill outcomes per call, decode event lists per call."""

    def __init__(self, prefills, decodes):
        self.prefills, self.decodes = list(prefills), list(decodes)
        self.prefill_calls, self.aborts = [], []

    async def prefill(self, inst, req, timeout=600):
        self.prefill_calls.append((inst.address, req))
        outcome = self.prefills.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return result(req, outcome)

    async def decode(self, inst, dreq):
        self.decode_calls = getattr(self, "decode_calls", []) + [inst.address]
        outcome = self.decodes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        for ev in outcome:
            if ev is HANG:  # a stopped process: the stream neither ends nor sends
                await asyncio.Event().wait()
            yield ev

    async def abort(self, inst, service, request_id):
        self.aborts.append((service, request_id))
        return True


HANG = object()


def run(script: Script, body, decodes=("10.0.1.1:1",), health=None, **backend_args):
    """health: address -> what its health check answers (True, or None for no answer)."""
    health = {} if health is None else health

    async def main():
        async def check(inst):
            return health.get(inst.address, True)
        router = Router(ProxyMetrics(), health_check=check)
        router.set_members("prefill", ["10.0.0.1:1", "10.0.0.2:1"])
        router.set_members("decode", list(decodes))
        await router.health_round()
        try:
            return await body(PDBackend(router, **backend_args), router)
        finally:
            await router.stop()
    mp = pytest.MonkeyPatch()
    for name in ("prefill", "decode", "abort", "prefill_stream"):
        if hasattr(script, name):
            mp.setattr(backend_mod.pd_client, name, getattr(script, name))
    try:
        return asyncio.run(main())
    finally:
        mp.undo()


REQ = PrefillRequest("r", (1, 2, 3), sampling=SamplingParams(max_tokens=6, temperature=0))


async def collect(backend, req=REQ):
    return [(s.token.token_id if s.token else None, s.finish_reason) async for s in backend.generate(req, b"k")]


def ev(token, reason=""):
    return TokenEvent(SampledToken(token) if token is not None else None, reason)


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED])
def test_prefill_unavailable_is_retried_once_on_another(code):
    script = Script([rpc_error(code), 10], [[ev(11), ev(12, "length")]])

    async def body(backend, router):
        steps = await collect(backend)
        return steps, [s.address for s in router.healthy("prefill")]
    steps, healthy = run(script, body)
    assert steps == [(10, ""), (11, ""), (12, "length")]
    first, second = (addr for addr, _ in script.prefill_calls)
    assert first != second and healthy == [second]  # the failed one is out until a health check


def test_invalid_argument_is_a_400_with_the_nodes_message():
    script = Script([rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "media 0: grid mismatch")], [])

    async def body(backend, router):
        with pytest.raises(APIError) as err:
            await collect(backend)
        return err.value
    err = run(script, body)
    assert (err.status, err.message) == (400, "media 0: grid mismatch")


def test_second_prefill_failure_is_503():
    script = Script([rpc_error(grpc.StatusCode.UNAVAILABLE)] * 2, [])

    async def body(backend, router):
        with pytest.raises(APIError) as err:
            await collect(backend)
        return err.value
    assert run(script, body).status == 503


def test_preempted_request_is_prefilled_again_with_its_tokens():
    script = Script([10, 13], [[ev(11), ev(12), ev(None, "preempted")], [ev(14), ev(15, "length")]])
    steps = run(script, lambda backend, router: collect(backend))
    assert steps == [(10, ""), (11, ""), (12, ""), (13, ""), (14, ""), (15, "length")]
    again = script.prefill_calls[1][1]
    assert again.prompt_token_ids == (1, 2, 3, 10, 11, 12)
    assert (again.request_id, again.sampling.max_tokens) == ("r-r1", 3)


def test_stopping_after_the_first_token_aborts_the_lease():
    script = Script([10], [[ev(11), ev(12, "length")]])

    async def body(backend, router):
        gen = backend.generate(REQ, b"k")
        first = await anext(gen)
        await gen.aclose()
        await asyncio.sleep(0.05)  # the abort is fire-and-forget
        return first
    first = run(script, body)
    assert first.token.token_id == 10 and script.aborts == [("prefill", "r")]


def test_decode_error_event_is_a_server_error():
    script = Script([10], [[ev(11), TokenEvent(None, "error", error="KV gone")]])

    async def body(backend, router):
        with pytest.raises(APIError) as err:
            await collect(backend)
        return err.value
    err = run(script, body)
    assert err.status == 500 and "KV gone" in err.message


@pytest.mark.parametrize("code", [grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION])
def test_a_full_or_mismatched_decode_hands_the_request_to_the_other(code):
    script = Script([10], [rpc_error(code, "decode is out of KV blocks"), [ev(11), ev(12, "length")]])

    async def body(backend, router):
        return await collect(backend), [s.address for s in router.healthy("decode")]
    steps, healthy = run(script, body, decodes=("10.0.1.1:1", "10.0.1.2:1"))
    assert steps == [(10, ""), (11, ""), (12, "length")]
    assert len(set(script.decode_calls)) == 2 and len(healthy) == 2  # full is not down


def test_every_decode_full_is_a_429():
    full = rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "decode is out of KV blocks")
    script = Script([10], [full, full])

    async def body(backend, router):
        with pytest.raises(APIError) as err:
            await collect(backend)
        return err.value
    err = run(script, body, decodes=("10.0.1.1:1", "10.0.1.2:1"))
    assert err.status == 429 and "out of KV blocks" in err.message


async def raises(aw) -> APIError:
    with pytest.raises(APIError) as err:
        await aw
    return err.value


def test_a_decode_that_stops_answering_health_checks_ends_the_stream_with_a_503():
    script = Script([10], [[ev(11), HANG]])
    health = {}

    async def body(backend, router):
        task = asyncio.ensure_future(raises(collect(backend)))
        await asyncio.sleep(0.05)  # the request is waiting for its third token
        health["10.0.1.1:1"] = None
        await router.health_round()
        assert not task.done()  # one missed check is not yet lost
        await router.health_round()
        return await asyncio.wait_for(task, 5)
    err = run(script, body, health=health)
    assert (err.status, err.message) == (503, "decode 10.0.1.1:1: 10.0.1.1:1 stopped answering health checks")


def test_a_running_request_without_a_token_for_token_timeout_is_a_503():
    script = Script([10], [[ev(11), HANG]])
    err = run(script, lambda backend, router: raises(collect(backend)), token_timeout_s=0.2)
    assert (err.status, err.message) == (503, "decode 10.0.1.1:1: no token for 0.2 s from 10.0.1.1:1")


def test_a_full_prefill_hands_the_request_to_the_other_and_stays_in_rotation():
    full = rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "prefill p has 4 requests waiting")
    script = Script([full, 10], [[ev(11), ev(12, "length")]])

    async def body(backend, router):
        return await collect(backend), len(router.healthy("prefill"))
    steps, healthy = run(script, body)
    assert steps == [(10, ""), (11, ""), (12, "length")] and healthy == 2
    assert len({addr for addr, _ in script.prefill_calls}) == 2


def test_every_prefill_full_is_a_429():
    full = rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "prefill p has 4 requests waiting")
    err = run(Script([full, full], []), lambda backend, router: raises(collect(backend)))
    assert err.status == 429 and "4 requests waiting" in err.message


def test_a_lease_decode_could_not_confirm_gets_the_request_prefilled_again():
    lost = rpc_error(grpc.StatusCode.UNAVAILABLE, "KV lease of request r on prefill p could not be confirmed")
    script = Script([10, 13], [lost, [ev(14), ev(15, "length")]])
    steps = run(script, lambda backend, router: collect(backend))
    assert steps == [(10, ""), (13, ""), (14, ""), (15, "length")]
    assert script.prefill_calls[1][1].prompt_token_ids == (1, 2, 3, 10)


@pytest.mark.parametrize("details", ["KV read from prefill p (127.0.0.1:1) failed: return code -1",
                                     "KV stream from prefill p ended without a result",
                                     "KV lease of request r expired on p"])
def test_kv_decode_could_not_read_is_prefilled_again_not_retried_on_the_same_decode(details):
    unreadable = rpc_error(grpc.StatusCode.UNAVAILABLE, details)
    script = Script([10, 13], [unreadable, [ev(14), ev(15, "length")]])
    steps = run(script, lambda backend, router: collect(backend))
    assert steps == [(10, ""), (13, ""), (14, ""), (15, "length")]
    assert script.decode_calls == ["10.0.1.1:1", "10.0.1.1:1"]
    assert [r.request_id for _, r in script.prefill_calls] == ["r", "r-r1"]  # a fresh id: no ALREADY_EXISTS


def test_a_failed_decode_with_no_other_healthy_is_not_retried_on_itself():
    down = rpc_error(grpc.StatusCode.UNAVAILABLE, "connection refused")
    script = Script([10], [down, [ev(11), ev(12, "length")]])
    err = run(script, lambda backend, router: raises(collect(backend)))
    assert err.status == 503 and script.decode_calls == ["10.0.1.1:1"]


class LayerwiseScript(Script):
    """PrefillStream: the announce, then (unless `hang`) the result; every stream's closing is kept."""

    def __init__(self, decodes, hang_after_announce):
        super().__init__([], decodes)
        self.hang, self.closed = hang_after_announce, []

    async def prefill_stream(self, inst, req, timeout=600):
        try:
            handle = result(req, 10).handle
            yield PrefillStreamEvent(announce=handle)
            if self.hang:
                await asyncio.Event().wait()
            yield PrefillStreamEvent(result=result(req, 10))
        finally:
            self.closed.append("prefill")

    async def decode(self, inst, dreq):
        try:
            async for e in super().decode(inst, dreq):
                yield e
        finally:
            self.closed.append("decode")


@pytest.mark.parametrize("cancel_at", ["between announce and result", "at the first decode token"])
def test_a_cancelled_layerwise_round_closes_every_stream_it_opened(cancel_at):
    hang = cancel_at == "between announce and result"
    script = LayerwiseScript([[HANG] if not hang else [ev(11), HANG]], hang_after_announce=hang)

    async def body(backend, router):
        task = asyncio.ensure_future(collect(backend))
        for _ in range(50):  # bounded: until both streams are open and waiting
            await asyncio.sleep(0.01)
        assert "decode" not in script.closed and not task.done()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return sorted(script.closed)
    assert run(script, body, layerwise=True) == ["decode", "prefill"]

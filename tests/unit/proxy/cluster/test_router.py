"""Routing: rendezvous affinity under a load cap, least-loaded decode, health in and out."""
from __future__ import annotations

import asyncio
import dataclasses

import pytest

from qwenvl_pd.messages import LoadReport, PrefillRequest
from qwenvl_pd.proxy.cluster.backend import _continuation
from qwenvl_pd.proxy.errors import APIError
from qwenvl_pd.proxy.metrics import ProxyMetrics
from qwenvl_pd.proxy.cluster.router import Router, affinity_key
from qwenvl_pd.sampling_params import SamplingParams

P = ["10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1"]
D = ["10.0.1.1:2", "10.0.1.2:2"]


def run(coro_fn):
    """Routers own grpc.aio channels, which want a running loop."""
    async def main():
        healthy = set(P + D)

        async def check(instance):
            return instance.address in healthy
        router = Router(ProxyMetrics(), prefill_load_cap=2, health_check=check)
        router.set_members("prefill", P)
        router.set_members("decode", D)
        await router.health_round()
        try:
            return await coro_fn(router, healthy)
        finally:
            await router.stop()
    return asyncio.run(main())


def key(i: int, images=()) -> bytes:
    return affinity_key(list(range(i, i + 40)), images, 16)


def test_affinity_is_stable_and_spreads_keys():
    async def body(router, _):
        picks = [router.pick_prefill(key(i)).address for i in range(60)]
        again = [router.pick_prefill(key(i)).address for i in range(60)]
        return picks, again
    picks, again = run(body)
    assert picks == again
    assert set(picks) == set(P)  # 60 keys over 3 instances: each gets some


def test_key_covers_first_block_and_image_hashes():
    base = list(range(100))
    assert affinity_key(base, (), 16) == affinity_key(base[:16] + [7] * 50, (), 16)
    assert affinity_key(base, (), 16) != affinity_key(base, ("abc",), 16)
    assert affinity_key(base, ("abc",), 16) != affinity_key(base, ("abd",), 16)


def test_load_cap_gives_way_to_least_loaded():
    async def body(router, _):
        first = router.pick_prefill(key(1))
        with router.using(first), router.using(first):  # at the cap (2)
            second = router.pick_prefill(key(1))
        return first, second, router.pick_prefill(key(1))
    first, second, after = run(body)
    assert second is not first and after is first


def test_reported_load_counts_too():
    async def body(router, _):
        first = router.pick_prefill(key(3))
        first.report = LoadReport("prefill", "p", running=1, waiting=5)
        return first, router.pick_prefill(key(3))
    first, second = run(body)
    assert second is not first


def test_decode_least_loaded_then_in_turn():
    async def body(router, _):
        a, b = (router.instances["decode"][d] for d in D)
        a.report = LoadReport("decode", "a", running=3)
        busy = [router.pick_decode() for _ in range(3)]
        a.report = None
        idle = [router.pick_decode().address for _ in range(4)]
        return busy, b, idle
    busy, b, idle = run(body)
    assert busy == [b, b, b]
    assert sorted(idle) == sorted(D * 2)  # ties alternate, so an idle cluster still spreads


def test_health_drops_and_brings_back_and_503_when_none():
    async def body(router, healthy):
        healthy.discard(P[0])
        await router.health_round()
        without = {router.pick_prefill(key(i)).address for i in range(30)}
        healthy.add(P[0])
        await router.health_round()
        back = {router.pick_prefill(key(i)).address for i in range(30)}
        healthy.difference_update(D)
        await router.health_round()
        ready = router.ready()
        with pytest.raises(APIError) as err:
            router.pick_decode()
        return without, back, ready, err.value
    without, back, ready, err = run(body)
    assert P[0] not in without and back == set(P)
    assert not ready and err.status == 503 and err.code == "no_backend"


def test_lost_after_two_unanswered_checks_and_found_again_on_an_answer():
    answers: dict[str, bool | None] = {}

    async def main():
        async def check(instance):
            return answers.get(instance.address, True)
        router = Router(ProxyMetrics(), health_check=check)
        router.set_members("decode", D)
        seen = []
        for answer in (None, None, False, True, None):  # no answer, no answer, NOT_SERVING, ...
            answers[D[0]] = answer
            await router.health_round()
            s = router.instances["decode"][D[0]]
            seen.append((s.healthy, s.misses, s.lost.is_set()))
        await router.stop()
        return seen
    assert asyncio.run(main()) == [(False, 1, False), (False, 2, True), (False, 0, False),
                                   (True, 0, False), (False, 1, False)]


def test_mark_failed_and_exclude():
    async def body(router, _):
        first = router.pick_prefill(key(5))
        retry = router.pick_prefill(key(5), exclude=[first])
        router.mark_failed(first)
        return first, retry, router.pick_prefill(key(5))
    first, retry, after = run(body)
    assert retry is not first and after is not first


def test_membership_changes():
    async def body(router, _):
        router.set_members("prefill", P[1:] + ["10.0.0.9:1"], healthy=True)
        return sorted(router.instances["prefill"]), [s.address for s in router.healthy("prefill")]
    members, healthy = run(body)
    assert members == sorted(P[1:] + ["10.0.0.9:1"])
    assert "10.0.0.9:1" in healthy


def test_reprefill_continuation_keeps_the_budget():
    sp = SamplingParams(max_tokens=10, min_tokens=4, seed=3)
    req = PrefillRequest("r", (1, 2, 3), sampling=sp)
    cont = _continuation(req, [7, 8, 9], 1)
    assert cont.prompt_token_ids == (1, 2, 3, 7, 8, 9) and cont.request_id == "r-r1"
    assert (cont.sampling.max_tokens, cont.sampling.min_tokens, cont.sampling.seed) == (7, 1, 3)
    assert dataclasses.replace(cont, request_id="r").media == req.media

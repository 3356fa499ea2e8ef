"""The encode round's decisions: which encoder (affinity, load cap), when to skip (media lately
sent to the prefill), and the fallbacks to bytes (encoder down or late, a prefill that cannot read
the embeddings). Prefill is scripted at pd_client, as in test_backend.py; the Encode RPC runs on a
real gRPC server on loopback where the test needs its wire or its deadline."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from qwenvl_pd.kv_transfer.embedding_handle import EmbeddingHandle
from qwenvl_pd.kv_transfer.handle import KVHandle, LayoutFingerprint
from qwenvl_pd.messages import (ENCODE, EncodeResult, LoadReport, MediaItem, PrefillRequest, PrefillResult,
                                PrefillStreamEvent, SampledToken, TokenEvent)
from qwenvl_pd.protos import convert, qwenvl_pd_pb2_grpc as pb_grpc
from qwenvl_pd.proxy.cluster import backend as backend_mod
from qwenvl_pd.proxy.cluster.backend import PDBackend
from qwenvl_pd.proxy.cluster.encode_round import RecentMedia, with_embeddings
from qwenvl_pd.proxy.cluster.instance import Instance
from qwenvl_pd.proxy.cluster.router import Router
from qwenvl_pd.proxy.errors import APIError
from qwenvl_pd.proxy.metrics import ProxyMetrics
from qwenvl_pd.sampling_params import SamplingParams

FP = LayoutFingerprint("m", "float32", 16, 2, 2, 8)
E = ["10.0.2.1:3", "10.0.2.2:3", "10.0.2.3:3"]
PREFILL, DECODE = "10.0.0.1:1", "10.0.1.1:2"


def image(h: str, data: bytes = b"png") -> MediaItem:
    return MediaItem("image", h, (1, 4, 4), data=data)


def handle(h: str, lease: str = "", control: str = E[0]) -> EmbeddingHandle:
    return EmbeddingHandle(f"{h}|fp", "enc-1", "127.0.0.1:9", 4096, 4 * 8 * 4, 4, 8, "float32", "vfp",
                           control_address=control, lease_id=lease)


def rpc_error(code, details="boom"):
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


REQ = PrefillRequest("r", (1, 2, 3), (image("aa", b"one"), image("bb", b"two")),
                     SamplingParams(max_tokens=2, temperature=0))


class Script:
    """pd_client's prefill, decode, encode and release, scripted: outcomes in order, calls kept."""

    def __init__(self, prefills=(), encodes=()):
        self.prefills, self.encodes = list(prefills), list(encodes)
        self.prefill_calls, self.encode_calls, self.releases = [], [], []

    async def prefill(self, inst, req, timeout=600):
        self.prefill_calls.append((inst.address, req))
        outcome = self.prefills.pop(0) if self.prefills else 7
        if isinstance(outcome, Exception):
            raise outcome
        kv = KVHandle("p", "127.0.0.1:1", 0, 64, 8, (0,), 3, FP)
        return PrefillResult(req.request_id, SampledToken(outcome), 0, 3, kv)

    async def decode(self, inst, dreq):
        yield TokenEvent(SampledToken(8), "length")

    async def encode(self, inst, req, timeout):
        self.encode_calls.append((inst.address, tuple(m.content_hash for m in req.media)))
        outcome = self.encodes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def release(self, inst, release):
        self.releases.append((inst.address, release.lease_ids, release.instance_id))

    async def abort(self, inst, service, request_id):
        return True


def run(script: Script | None, body, encoders=(E[0],), health=None, layerwise=False, **router_args):
    health = {} if health is None else health

    async def main():
        async def check(inst):
            return health.get(inst.address, True)
        router = Router(ProxyMetrics(), health_check=check, **router_args)
        router.set_members("prefill", [PREFILL])
        router.set_members("decode", [DECODE])
        router.set_members(ENCODE, list(encoders))
        await router.health_round()
        try:
            return await body(PDBackend(router, layerwise=layerwise), router)
        finally:
            await router.stop()
    mp = pytest.MonkeyPatch()
    for name in ("prefill", "decode", "encode", "release", "abort", "prefill_stream"):
        if script is not None and hasattr(script, name):
            mp.setattr(backend_mod.pd_client, name, getattr(script, name))
    try:
        return asyncio.run(main())
    finally:
        mp.undo()


async def tokens(backend, req=REQ):
    return [e.token.token_id async for e in backend.generate(req, b"k")]


def media_sent(req: PrefillRequest) -> list[tuple[bytes, str | None]]:
    return [(m.data, m.embedding.key if m.embedding else None) for m in req.media]


def series(router: Router) -> dict[str, float]:
    m = router.metrics
    return {"rounds": m.encode_rounds.value(), "skips": m.encode_skips.value(),
            "observed": m.encode_round_seconds.count}


# --- choices ---------------------------------------------------------------------------------------


def test_pick_encode_follows_the_first_hash_then_load_and_none_without_encoders():
    async def body(backend, router):
        picks = [router.pick_encode(f"h{i}").address for i in range(30)]
        again = [router.pick_encode(f"h{i}").address for i in range(30)]
        first = router.pick_encode("h1")
        with router.using(first), router.using(first):  # at the encode cap (2)
            busy = router.pick_encode("h1")
        for s in router.instances[ENCODE].values():
            s.healthy = False
        return picks, again, first, busy, router.pick_encode("h1"), router.ready()
    picks, again, first, busy, none, ready = run(None, body, encoders=E, encode_load_cap=2)
    assert picks == again and set(picks) == set(E)
    assert busy is not first and busy.load == 0
    assert none is None and ready is True  # the cluster serves without any encoder


def test_health_and_load_rounds_cover_encoders():
    async def body(backend, router):
        enc = router.instances[ENCODE][E[1]]
        return enc.healthy, [s.address for s in router.healthy(ENCODE)], router.ready()
    healthy, listed, ready = run(None, body, encoders=E, health={E[1]: False})
    assert (healthy, listed, ready) == (False, [E[0], E[2]], True)


def test_recent_media_keeps_the_latest_form_per_prefill():
    recent = RecentMedia(per_instance=2)
    recent.add("p1", [("a", True), ("b", True)])
    recent.add("p1", [("a", True)])  # a is now the most recent
    recent.add("p1", [("c", True)])  # b, the least recent, goes
    assert [recent.as_bytes("p1", h) for h in "abc"] == [True, False, True]
    recent.add("p1", [("c", False)])  # then sent as a handle: prefill keys it by the embedding key
    assert [recent.as_bytes("p1", h) for h in "ac"] == [True, False]
    assert recent.as_bytes("p2", "a") is False
    recent.add("p2", [("a", True)])
    recent.keep(["p2"])  # p1 left the cluster
    assert (recent.as_bytes("p1", "a"), recent.as_bytes("p2", "a")) == (False, True)


def test_with_embeddings_keeps_grid_hash_and_timing_and_drops_bytes():
    video = MediaItem("video", "vv", (2, 4, 4), frames=(b"f1", b"f2"), fps=2.0, second_per_grid_t=1.0,
                      timestamps=(0.0, 1.0))
    req = PrefillRequest("r", (1,), (image("aa"), video))
    sent = with_embeddings(req, [handle("aa"), handle("vv")])
    got = [(m.kind, m.content_hash, m.grid_thw, m.data, m.frames, m.second_per_grid_t, m.timestamps,
            m.embedding.key) for m in sent.media]
    assert got == [("image", "aa", (1, 4, 4), b"", (), None, (), "aa|fp"),
                   ("video", "vv", (2, 4, 4), b"", (), 1.0, (0.0, 1.0), "vv|fp")]
    with pytest.raises(ValueError, match="1 handles for 2 media items"):
        with_embeddings(req, [handle("aa")])
    only_video = with_embeddings(req, [handle("vv")], [1])
    assert [(m.data, m.frames, m.embedding and m.embedding.key) for m in only_video.media] == [
        (b"png", (), None), (b"", (), "vv|fp")]


# --- the round in the request path -----------------------------------------------------------------


def test_text_only_never_touches_an_encoder():
    script = Script()

    async def body(backend, router):
        return await tokens(backend, PrefillRequest("t", (1, 2), sampling=SamplingParams(max_tokens=2)))
    assert run(script, body) == [7, 8]
    assert script.encode_calls == [] and media_sent(script.prefill_calls[0][1]) == []


def test_handles_go_to_prefill_and_the_same_media_again_gets_handles_again():
    # prefill keys media it got as handles by the embedding key: bytes now would miss its caches
    script = Script(encodes=[EncodeResult((handle("aa"), handle("bb")))] * 2)

    async def body(backend, router):
        first, second = await tokens(backend), await tokens(backend)
        return first, second, series(router)
    first, second, counts = run(script, body)
    assert first == second == [7, 8]
    assert script.encode_calls == [(E[0], ("aa", "bb"))] * 2
    assert [media_sent(r) for _, r in script.prefill_calls] == [[(b"", "aa|fp"), (b"", "bb|fp")]] * 2
    assert counts == {"rounds": 2, "skips": 0, "observed": 2}


def test_media_a_prefill_got_as_bytes_skips_the_round_next_time():
    script = Script(encodes=[rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "encode queue full")])

    async def body(backend, router):
        first, second = await tokens(backend), await tokens(backend)
        other = PrefillRequest("r2", (1, 2, 3), (image("aa", b"one"), image("cc", b"new")))
        script.encodes.append(EncodeResult((handle("cc"),)))
        third = await tokens(backend, other)  # cc is new there: a round for cc alone
        return first, second, third, series(router)
    first, second, third, counts = run(script, body)
    assert first == second == third == [7, 8]
    assert script.encode_calls == [(E[0], ("aa", "bb")), (E[0], ("cc",))]
    assert [media_sent(r) for _, r in script.prefill_calls] == [
        [(b"one", None), (b"two", None)], [(b"one", None), (b"two", None)], [(b"one", None), (b"", "cc|fp")]]
    assert counts == {"rounds": 1, "skips": 1, "observed": 1}


@pytest.mark.parametrize("code,marked", [(grpc.StatusCode.UNAVAILABLE, True),
                                         (grpc.StatusCode.DEADLINE_EXCEEDED, True),
                                         (grpc.StatusCode.RESOURCE_EXHAUSTED, False),
                                         (grpc.StatusCode.INTERNAL, False)])
def test_an_encoder_failure_sends_the_bytes(code, marked):
    script = Script(encodes=[rpc_error(code)])

    async def body(backend, router):
        out = await tokens(backend)
        enc = router.instances[ENCODE][E[0]]
        return out, router.metrics.encode_fallbacks.value(reason=code.name), enc.healthy, series(router)
    out, fallbacks, healthy, counts = run(script, body)
    assert out == [7, 8] and fallbacks == 1 and healthy is (not marked)
    assert [media_sent(r) for _, r in script.prefill_calls] == [[(b"one", None), (b"two", None)]]
    assert counts == {"rounds": 0, "skips": 0, "observed": 0}


def rendezvous_order(content_hash: str, addresses) -> list[str]:
    from qwenvl_pd.proxy.cluster.router import _rendezvous
    return sorted(addresses, key=lambda a: _rendezvous(content_hash.encode(), a), reverse=True)


@pytest.mark.parametrize("failure,marked", [(rpc_error(grpc.StatusCode.UNAVAILABLE), True),
                                            (rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED), True),
                                            (rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED), False),
                                            (rpc_error(grpc.StatusCode.INTERNAL), False),
                                            (EncodeResult((handle("aa"),)), False)])
def test_a_failed_encode_is_tried_once_more_on_the_next_encoder_in_rendezvous_order(failure, marked):
    script = Script(encodes=[failure, EncodeResult((handle("aa"), handle("bb")))])
    why = failure.code().name if isinstance(failure, grpc.aio.AioRpcError) else "BAD_REPLY"

    async def body(backend, router):
        out = await tokens(backend)
        m = router.metrics
        return (out, m.encode_retries.value(reason=why), m.encode_fallbacks.value(reason=why),
                router.instances[ENCODE][first].healthy, series(router))
    first, second, _ = rendezvous_order("aa", E)
    out, retries, fallbacks, healthy, counts = run(script, body, encoders=E)
    assert out == [7, 8] and (retries, fallbacks) == (1, 0) and healthy is (not marked)
    assert script.encode_calls == [(first, ("aa", "bb")), (second, ("aa", "bb"))]
    assert media_sent(script.prefill_calls[0][1]) == [(b"", "aa|fp"), (b"", "bb|fp")]
    assert counts == {"rounds": 1, "skips": 0, "observed": 1}


def test_a_second_failure_sends_the_bytes_and_a_third_encoder_is_not_tried():
    script = Script(encodes=[rpc_error(grpc.StatusCode.UNAVAILABLE), rpc_error(grpc.StatusCode.INTERNAL)])

    async def body(backend, router):
        out = await tokens(backend)
        m = router.metrics
        return out, m.encode_retries.value(reason="UNAVAILABLE"), m.encode_fallbacks.value(reason="INTERNAL")
    assert run(script, body, encoders=E) == ([7, 8], 1, 1)
    assert script.encode_calls == [(a, ("aa", "bb")) for a in rendezvous_order("aa", E)[:2]]
    assert media_sent(script.prefill_calls[0][1]) == [(b"one", None), (b"two", None)]


def test_a_short_reply_sends_the_bytes():
    script = Script(encodes=[EncodeResult((handle("aa"),))])

    async def body(backend, router):
        return await tokens(backend), router.metrics.encode_fallbacks.value(reason="BAD_REPLY")
    assert run(script, body) == ([7, 8], 1)
    assert media_sent(script.prefill_calls[0][1]) == [(b"one", None), (b"two", None)]


def test_unreadable_embeddings_resend_the_bytes_to_the_same_prefill_and_release_the_leases():
    unreadable = rpc_error(grpc.StatusCode.FAILED_PRECONDITION, "embeddings unavailable: aa|fp: read timed out")
    script = Script(prefills=[unreadable, 7], encodes=[EncodeResult((handle("aa", "L1"), handle("bb", "L2")))])

    async def body(backend, router):
        out = await tokens(backend)
        await asyncio.sleep(0)  # the release runs beside the request
        return out, router.metrics.encode_fallbacks.value(reason="EMBEDDINGS_UNAVAILABLE")
    out, fallbacks = run(script, body)
    assert out == [7, 8] and fallbacks == 1
    assert [(a, media_sent(r)) for a, r in script.prefill_calls] == [
        (PREFILL, [(b"", "aa|fp"), (b"", "bb|fp")]), (PREFILL, [(b"one", None), (b"two", None)])]
    assert script.releases == [(E[0], ("L1", "L2"), "enc-1")]


def test_a_prefill_refusing_the_item_gets_the_bytes_and_bad_bytes_stay_a_400():
    # a prefill older than EPD sees an empty image; really bad input is refused again, then a 400
    empty = rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "bytes are not a decodable image (0 bytes)")
    bad = rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "media 0: grid mismatch")
    script = Script(prefills=[empty, 7, bad, bad],
                    encodes=[EncodeResult((handle("aa"), handle("bb"))), EncodeResult((handle("cc"),))])

    async def body(backend, router):
        out = await tokens(backend)
        with pytest.raises(APIError) as err:  # new media: a round again
            await tokens(backend, PrefillRequest("r2", (1, 2, 3), (image("aa", b"one"), image("cc", b"bad"))))
        return out, err.value, router.metrics.encode_fallbacks.value(reason="INVALID_ARGUMENT")
    out, err, fallbacks = run(script, body)
    assert out == [7, 8] and (err.status, err.message) == (400, "media 0: grid mismatch") and fallbacks == 2
    assert [media_sent(r) for _, r in script.prefill_calls] == [
        [(b"", "aa|fp"), (b"", "bb|fp")], [(b"one", None), (b"two", None)],
        [(b"one", None), (b"", "cc|fp")], [(b"one", None), (b"bad", None)]]


def test_a_prefill_not_allowed_to_read_from_the_encoder_gets_the_bytes_and_the_leases_go_back():
    denied = rpc_error(grpc.StatusCode.PERMISSION_DENIED, "item 0's embedding handle names 127.0.0.1, not an "
                       "encoder this prefill reads from (--allowed-encoders 10.255.255.1)")
    script = Script(prefills=[denied, 7], encodes=[EncodeResult((handle("aa", "L1"), handle("bb", "L2")))])

    async def body(backend, router):
        out = await tokens(backend)
        await asyncio.sleep(0)  # the release runs beside the request
        return out, router.metrics.encode_fallbacks.value(reason="PERMISSION_DENIED")
    assert run(script, body) == ([7, 8], 1)
    assert [media_sent(r) for _, r in script.prefill_calls] == [
        [(b"", "aa|fp"), (b"", "bb|fp")], [(b"one", None), (b"two", None)]]
    assert script.releases == [(E[0], ("L1", "L2"), "enc-1")]


def test_another_failed_precondition_is_the_clients_error():
    script = Script(prefills=[rpc_error(grpc.StatusCode.FAILED_PRECONDITION, "vision fingerprint differs")],
                    encodes=[EncodeResult((handle("aa"), handle("bb")))])

    async def body(backend, router):
        with pytest.raises(APIError) as err:
            await tokens(backend)
        return err.value
    err = run(script, body)
    assert err.status == 500 and "vision fingerprint differs" in err.message
    assert len(script.prefill_calls) == 1


class LayerwiseScript(Script):
    """PrefillStream answering its result at once (no announce: decode runs the whole-KV path)."""

    async def prefill_stream(self, inst, req, timeout=600):
        self.prefill_calls.append((inst.address, req))
        kv = KVHandle("p", "127.0.0.1:1", 0, 64, 8, (0,), 3, FP)
        yield PrefillStreamEvent(result=PrefillResult(req.request_id, SampledToken(7), 0, 3, kv))


def test_the_layerwise_round_carries_the_handles_and_remembers_the_form():
    script = LayerwiseScript(encodes=[EncodeResult((handle("aa"), handle("bb"))),
                                      rpc_error(grpc.StatusCode.INTERNAL, "tower failed")])

    async def body(backend, router):
        return [await tokens(backend) for _ in range(3)], series(router)
    outs, counts = run(script, body, layerwise=True)
    assert outs == [[7, 8]] * 3
    assert [media_sent(r) for _, r in script.prefill_calls] == [
        [(b"", "aa|fp"), (b"", "bb|fp")], [(b"one", None), (b"two", None)], [(b"one", None), (b"two", None)]]
    assert counts == {"rounds": 1, "skips": 1, "observed": 1}  # handles, a failed round, then a skip


def test_a_continuation_carries_the_original_bytes():
    req = PrefillRequest("r", (1, 2, 3), (image("aa", b"one"),), SamplingParams(max_tokens=4))
    cont = backend_mod._continuation(req, [7, 8], 1)
    assert [(m.data, m.embedding) for m in cont.media] == [(b"one", None)]


# --- over real gRPC --------------------------------------------------------------------------------


class Encoder(pb_grpc.EncodeServicer):
    def __init__(self, delay_s: float = 0.0):
        self.delay_s, self.calls = delay_s, 0

    async def Encode(self, request, context):
        self.calls += 1
        await asyncio.sleep(self.delay_s)
        return convert.to_proto(EncodeResult(tuple(handle(m.content_hash) for m in request.media), hits=0))

    async def GetLoad(self, request, context):
        return convert.to_proto(LoadReport(ENCODE, "enc-1", embedding_hits=3, embedding_misses=1))


async def _serve(servicer) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    pb_grpc.add_EncodeServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


@pytest.mark.parametrize("delay_s,expect", [(0.0, [(b"", "aa|fp"), (b"", "bb|fp")]),
                                            (2.0, [(b"one", None), (b"two", None)])])
def test_encode_over_grpc_and_its_deadline(delay_s, expect):
    async def main():
        servicer = Encoder(delay_s)
        server, address = await _serve(servicer)
        router = Router(ProxyMetrics(), health_check=lambda inst: asyncio.sleep(0, True))
        router.set_members(ENCODE, [address])
        router.set_members("prefill", [PREFILL])
        await router.health_round()
        try:
            backend = PDBackend(router, encode_timeout_s=0.3)
            sent = await backend.encode.prepare(REQ, router.instances["prefill"][PREFILL])
            await router.health_round()  # a late encoder is out of rotation until it answers one
            await router.load_round()
            s = router.metrics.render()
            return servicer.calls, media_sent(sent), s
        finally:
            await router.stop()
            await server.stop(None)
    calls, sent, rendered = asyncio.run(main())
    assert calls == 1 and sent == expect
    assert 'qwenvl_pd:embedding_cache_hit_rate{role="encode",instance="enc-1"} 0.75' in rendered


def test_a_late_encoder_leaves_no_budget_for_a_retry():
    # --encode-timeout bounds the round, both tries together: the first one spent it all
    async def main():
        encoders = [Encoder(delay_s=2.0) for _ in range(2)]
        servers = [await _serve(e) for e in encoders]
        router = Router(ProxyMetrics(), health_check=lambda inst: asyncio.sleep(0, True))
        router.set_members(ENCODE, [a for _, a in servers])
        router.set_members("prefill", [PREFILL])
        await router.health_round()
        try:
            sent = await PDBackend(router, encode_timeout_s=0.3).encode.prepare(
                REQ, router.instances["prefill"][PREFILL])
            m = router.metrics
            return (media_sent(sent), sum(e.calls for e in encoders),
                    m.encode_retries.value(reason="DEADLINE_EXCEEDED"), m.encode_fallbacks.value(reason="DEADLINE_EXCEEDED"))
        finally:
            await router.stop()
            for server, _ in servers:
                await server.stop(None)
    assert asyncio.run(main()) == ([(b"one", None), (b"two", None)], 1, 0, 1)


def test_instance_connects_for_the_encode_role():
    async def main():
        inst = Instance.connect(ENCODE, "127.0.0.1:1")
        await inst.channel.close()
        return inst.role, inst.load
    assert asyncio.run(main()) == (ENCODE, 0)


def test_proxy_flags_and_config_for_encoders():
    from qwenvl_pd.cli import build_parser
    from qwenvl_pd.proxy.config import ProxyConfig, parse_addresses
    args = build_parser().parse_args(["proxy", "--prefill", "a:1", "--decode", "b:2", "--encode", "c:3,d:4",
                                      "--encode-timeout", "5"])
    assert (parse_addresses(args.encode), args.encode_timeout) == (("c:3", "d:4"), 5.0)
    assert build_parser().parse_args(["proxy"]).encode_timeout == 30.0
    with pytest.raises(ValueError, match="--encode-timeout must be > 0"):
        ProxyConfig(prefill=("a:1",), decode=("b:2",), encode=("c:3",), encode_timeout_s=0)

"""One sample of a request through the PD cluster: prefill, then the decode stream.

Yields the first token as soon as prefill answers (that is the TTFT the client sees), then each
decoded token. Closing the generator early (a stop string, a client that went away) cancels the
decode stream, which frees its blocks at once, and aborts a prefill lease nobody will pull.
Failures follow DESIGN.md's table: a prefill that fails before answering is retried once on
another prefill; decode unreachable before its first event, once on another decode; a decode
that hands the request back ("preempted") gets it re-prefilled with the tokens so far.
With encoders (EPD), encode_round.py's round runs once a prefill is picked; a prefill that cannot
read the embeddings gets the same request again with the media bytes.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator

import grpc

from qwenvl_pd.messages import KVHandle, PrefillRequest, PrefillResult, TokenEvent
from qwenvl_pd.proxy.cluster import pd_client
from qwenvl_pd.proxy.cluster.encode_round import EncodeRound, resend_bytes
from qwenvl_pd.proxy.cluster.layerwise_round import EarlyDecode, early_events, prefill_layerwise
from qwenvl_pd.proxy.errors import APIError, bad_request, overloaded
from qwenvl_pd.proxy.cluster.racing import unless_lost
from qwenvl_pd.proxy.cluster.instance import Instance
from qwenvl_pd.proxy.cluster.router import Router

log = logging.getLogger(__name__)
MAX_REPREFILLS = 4  # a request preempted this often is not going to fit
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
# a decode out of blocks, or one whose KV layout does not match: another decode may take it
DECODE_ELSEWHERE = RETRYABLE + (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION)
# decode's refusals that mean it could not get the prompt's KV from prefill: another prefill can
# compute it again, while another decode would fail the same way
KV_UNREADABLE = ("KV lease", "KV read", "KV stream")
PREFILL_ELSEWHERE = RETRYABLE + (grpc.StatusCode.RESOURCE_EXHAUSTED,)  # full: another may have room


def rpc_error(e: grpc.aio.AioRpcError, where: str) -> APIError:
    """A gRPC failure -> the status a client should see."""
    if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
        return bad_request(e.details())
    if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:  # full (blocks, queue): retry later
        return overloaded(f"{where}: {e.details()}")
    if e.code() in RETRYABLE:
        return APIError(503, f"{where}: {e.details()}", "service_unavailable", None, "backend_unavailable")
    return APIError(500, f"{where}: {e.code().name}: {e.details()}", "server_error", None, "backend_error")


class PDBackend:
    def __init__(self, router: Router, prefill_timeout_s: float = 600.0, token_timeout_s: float = 60.0,
                 layerwise: bool = False, encode_timeout_s: float = 30.0):
        self.router, self.layerwise = router, layerwise  # layerwise: layerwise_round.py's round
        self.prefill_timeout_s, self.token_timeout_s = prefill_timeout_s, token_timeout_s
        self.encode = EncodeRound(router, encode_timeout_s)

    def ready(self) -> bool:
        return self.router.ready()

    async def generate(self, req: PrefillRequest, key: bytes) -> AsyncIterator[TokenEvent]:
        produced: list[int] = []
        current = req
        for round_ in range(MAX_REPREFILLS + 1):
            early = None
            if self.layerwise:
                result, prefill, early = await self._prefill_layerwise(current, key)
            else:
                result, prefill = await self.prefill(current, key)
            produced.append(result.first_token.token_id)
            finished = bool(result.finish_reason)
            try:
                first = round_ == 0  # a continuation's prompt is not the client's
                yield TokenEvent(result.first_token, result.finish_reason,
                                 num_cached_tokens=result.num_cached_tokens if first else 0,
                                 prompt_logprobs=result.prompt_logprobs if first else None)
                if finished:
                    return
                preempted = False
                async with contextlib.aclosing(self._decode(current, result, early)) as events:
                    async for ev in events:
                        if ev.finish_reason == "preempted":
                            preempted = True
                            break
                        finished = bool(ev.finish_reason)
                        if ev.token is not None:
                            produced.append(ev.token.token_id)
                        if ev.finish_reason == "error":
                            raise APIError(500, f"decode failed: {ev.error}", "server_error", None,
                                           "decode_error")
                        yield ev
                        if finished:
                            return
                if not preempted:
                    raise APIError(500, "the decode stream ended without a finish reason",
                                   "server_error", None, "decode_error")
            finally:
                if early is not None:
                    await early.close()
                if not finished and result.handle is not None:
                    # harmless when decode already released it; frees the lease now otherwise
                    asyncio.ensure_future(_abort_quietly(prefill, current.request_id))
            log.info("request %s preempted on decode after %d tokens; prefilling it again",
                     req.request_id, len(produced))
            current = _continuation(req, produced, round_ + 1)
        raise APIError(503, f"request preempted {MAX_REPREFILLS + 1} times on decode (out of KV blocks)",
                       "service_unavailable", None, "preempted")

    async def prefill(self, req: PrefillRequest, key: bytes) -> tuple[PrefillResult, Instance]:
        tried: list[Instance] = []
        while True:
            state = self.router.pick_prefill(key, exclude=tried)  # 503 once none is left
            with self.router.using(state):
                try:
                    return await self._prefill_on(state, req), state
                except grpc.aio.AioRpcError as e:
                    if e.code() not in PREFILL_ELSEWHERE or tried or not self._others("prefill", state):
                        raise rpc_error(e, f"prefill {state.address}") from None
                    log.warning("prefill %s %s (%s); retrying on another", state.address,
                                e.code().name, e.details())
                    if e.code() in RETRYABLE:  # down or hung; a full one is merely busy
                        self.router.mark_failed(state)
                    tried.append(state)

    async def _prefill_on(self, state: Instance, req: PrefillRequest) -> PrefillResult:
        """One prefill on `state`, after the encode round; embeddings it cannot read: the bytes."""
        sent = await self.encode.prepare(req, state)
        try:
            result = await unless_lost(state, pd_client.prefill(state, sent, self.prefill_timeout_s))
        except grpc.aio.AioRpcError as e:
            if sent is req:
                raise
            self.encode.unread(sent, e)
            if not resend_bytes(e):
                raise
            sent = req
            result = await unless_lost(state, pd_client.prefill(state, sent, self.prefill_timeout_s))
        self.encode.sent(state, sent)
        return result

    async def _prefill_layerwise(self, req: PrefillRequest, key: bytes):
        """-> (result, prefill state, EarlyDecode | None); None: the whole-KV round ran instead."""
        state = self.router.pick_prefill(key)
        with self.router.using(state):
            sent = await self.encode.prepare(req, state)
            done = await prefill_layerwise(state, sent, self.prefill_timeout_s, self.start_early_decode)
        if done is not None:
            self.encode.sent(state, sent)
            return done[0], state, done[1]
        if sent is not req:  # whatever went wrong, the whole-KV round encodes (or skips) again
            self.encode.unread(sent)
        result, state = await self.prefill(req, key)
        return result, state, None

    def start_early_decode(self, req: PrefillRequest, announce: KVHandle) -> EarlyDecode:
        """The layer-wise round's decode, started on prefill's announce (the call starts now)."""
        state = self.pick_decode([])
        events = self.events(state, pd_client.layerwise_request(req, announce))
        return EarlyDecode(state, events, asyncio.ensure_future(anext(events)))

    def _others(self, role: str, state: Instance) -> bool:
        return any(s is not state for s in self.router.healthy(role))

    async def _decode(self, req: PrefillRequest, result: PrefillResult,
                      early: EarlyDecode | None = None) -> AsyncIterator[TokenEvent]:
        if early is not None:
            try:
                with self.router.using(early.state):
                    async with contextlib.aclosing(early_events(early, result)) as events:
                        async for ev in events:
                            if ev is None:
                                break  # failed before its first token: the whole-KV path below
                            yield ev
                        else:
                            return
            except grpc.aio.AioRpcError as e:
                raise rpc_error(e, f"decode {early.state.address}") from None
        dreq = pd_client.decode_request(req, result)
        tried: list[Instance] = []
        while True:
            state = self.pick_decode(tried)
            seen = False
            with self.router.using(state):
                try:
                    async with contextlib.aclosing(self.events(state, dreq)) as events:
                        async for ev in events:
                            seen = True
                            if ev.finish_reason:  # let the call end on its own: a cancel now
                                async for _ in events:  # would race decode's own clean-up
                                    pass
                            yield ev
                    return
                except grpc.aio.AioRpcError as e:
                    if not seen and kv_unreadable(e):  # prefill drained, died or lost the lease:
                        log.warning("request %s: %s; prefilling it again", req.request_id, e.details())
                        yield TokenEvent(finish_reason="preempted")  # re-prefill, as a hand-back does
                        return
                    if seen or tried or e.code() not in DECODE_ELSEWHERE or not self._others("decode", state):
                        raise rpc_error(e, f"decode {state.address}") from None
                    log.warning("decode %s failed before its first token (%s); retrying once on another",
                                state.address, e.details())
                    if e.code() in RETRYABLE:  # decode is down
                        self.router.mark_failed(state)
                    tried.append(state)

    async def events(self, state: Instance, dreq) -> AsyncIterator[TokenEvent]:
        """The decode stream, given up when decode stops answering health checks, or when a
        running request gets no token for token_timeout_s (the first may wait in decode's queue)."""
        async with contextlib.aclosing(pd_client.decode(state, dreq)) as events:
            lost, timeout = asyncio.ensure_future(state.lost.wait()), None  # one waiter a stream
            try:
                while True:
                    try:
                        ev = await unless_lost(state, anext(events), lost, timeout)
                    except StopAsyncIteration:
                        return
                    timeout = self.token_timeout_s
                    yield ev
            finally:
                lost.cancel()

    def pick_decode(self, tried: list[Instance]) -> Instance:
        # never the instance that just failed: the request may still be in flight there
        return self.router.pick_decode(exclude=tried)


def _continuation(req: PrefillRequest, produced: list[int], round_: int) -> PrefillRequest:
    """The same request with the tokens so far as prompt: prefill continues where decode stopped."""
    p = req.sampling
    spec = p.structured_outputs  # its matcher resumes after the tokens so far
    spec = spec and dataclasses.replace(spec, resume_token_ids=spec.resume_token_ids + tuple(produced))
    sampling = dataclasses.replace(p, max_tokens=p.max_tokens - len(produced), max_completion_tokens=None,
                                   min_tokens=max(0, p.min_tokens - len(produced)), structured_outputs=spec,
                                   prompt_logprobs=None)  # the first round's answered them
    return dataclasses.replace(req, request_id=f"{req.request_id}-r{round_}",
                               prompt_token_ids=tuple(req.prompt_token_ids) + tuple(produced),
                               sampling=sampling)


def kv_unreadable(e: grpc.aio.AioRpcError) -> bool:
    return (e.details() or "").startswith(KV_UNREADABLE)


async def _abort_quietly(state: Instance, request_id: str) -> None:
    try:
        await pd_client.abort(state, "prefill", request_id)
    except grpc.aio.AioRpcError:
        pass  # the lease frees the blocks anyway

"""The proxy's layer-wise round: PrefillStream's announce starts the decode at once, so decode
reads each group of layers while prefill computes the later ones; the result (the first token)
follows on the same stream.

A prefill that refuses layer-wise (FAILED_PRECONDITION: --kv-layer-group 0) or fails before its
result gets the whole-KV round instead (PDBackend.prefill, with its retry on another prefill);
a layer-wise decode that fails before its first token hands over to the whole-KV decode path
with the leased result, which may pick another decode.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc

from qwenvl_pd.messages import PrefillRequest, PrefillResult
from qwenvl_pd.proxy.cluster import pd_client
from qwenvl_pd.proxy.cluster.racing import unless_lost
from qwenvl_pd.proxy.cluster.router import InstanceState

log = logging.getLogger(__name__)


@dataclass
class EarlyDecode:
    """A layer-wise decode started on the announce: its events and the first one, pending."""
    state: InstanceState
    events: object  # the async generator of TokenEvents
    first: asyncio.Future

    async def close(self) -> None:
        self.first.cancel()
        await asyncio.gather(self.first, return_exceptions=True)
        await self.events.aclose()


async def prefill_layerwise(backend, req: PrefillRequest, key: bytes):
    """-> (result, prefill state, EarlyDecode | None); None: the whole-KV round ran instead."""
    state = backend.router.pick_prefill(key)
    early = None
    with backend.router.using(state):
        stream = pd_client.prefill_stream(state.instance, req, backend.prefill_timeout_s)
        try:
            first = await unless_lost(state, anext(stream))
            if first.announce is not None:
                early = _start_decode(backend, req, first)
                first = await unless_lost(state, anext(stream))
            return first.result, state, early
        except (grpc.aio.AioRpcError, StopAsyncIteration) as e:
            why = f"{e.code().name}: {e.details()}" if isinstance(e, grpc.aio.AioRpcError) else "no result"
            log.warning("layer-wise prefill of %s on %s failed (%s); whole-KV round instead",
                        req.request_id, state.address, why)
        except BaseException:  # cancelled (the client left, a sibling sample failed) or worse:
            if early is not None:  # the decode started on the announce must not run on
                await early.close()
            raise
        finally:
            await stream.aclose()
    if early is not None:
        await early.close()
    result, state = await backend.prefill(req, key)
    return result, state, None


def _start_decode(backend, req: PrefillRequest, first) -> EarlyDecode:
    state = backend.pick_decode([])
    events = backend.events(state, pd_client.layerwise_request(req, first.announce))
    return EarlyDecode(state, events, asyncio.ensure_future(anext(events)))  # the call starts now


async def early_events(backend, early: EarlyDecode, result: PrefillResult):
    """The layer-wise decode's events; None, and nothing after, when it failed before its first
    token (the caller then pulls the whole KV with the leased result)."""
    with backend.router.using(early.state):
        try:
            ev = await early.first
        except (grpc.aio.AioRpcError, StopAsyncIteration) as e:
            log.warning("layer-wise decode of %s on %s failed before its first token (%s); pulling the "
                        "whole KV instead", result.request_id, early.state.address, e)
            yield None
            return
        while not ev.finish_reason:
            yield ev
            try:
                ev = await anext(early.events)
            except StopAsyncIteration:
                return  # the caller reports a stream without a finish reason
        async for _ in early.events:  # let the call end on its own, as the whole path does
            pass
        yield ev

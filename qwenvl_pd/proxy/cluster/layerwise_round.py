"""The proxy's layer-wise round: PrefillStream's announce starts the decode at once, so decode
reads each group of layers while prefill computes the later ones; the result (the first token)
follows on the same stream.

A prefill that refuses layer-wise (FAILED_PRECONDITION: --kv-layer-group 0) or fails before its
result gets the whole-KV round instead (PDBackend runs it, with its retry on another prefill);
a layer-wise decode that fails before its first token hands over to the whole-KV decode path
with the leased result, which may pick another decode. The round calls nothing of PDBackend
but the StartDecode it is handed; the backend picks the instances and counts their load.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc

from qwenvl_pd.messages import KVHandle, PrefillRequest, PrefillResult, TokenEvent
from qwenvl_pd.proxy.cluster import pd_client
from qwenvl_pd.proxy.cluster.racing import unless_lost
from qwenvl_pd.proxy.cluster.instance import Instance

log = logging.getLogger(__name__)


@dataclass
class EarlyDecode:
    """A layer-wise decode started on the announce: its events and the first one, pending."""
    state: Instance
    events: AsyncIterator[TokenEvent]
    first: asyncio.Future

    async def close(self) -> None:
        self.first.cancel()
        await asyncio.gather(self.first, return_exceptions=True)
        await self.events.aclose()


# what the round needs of the backend: start a decode on the announce (a decode picked and its
# events, PDBackend.start_early_decode); everything else it is handed
StartDecode = Callable[[PrefillRequest, KVHandle], EarlyDecode]


async def prefill_layerwise(state: Instance, req: PrefillRequest, timeout_s: float,
                            start_decode: StartDecode) -> tuple[PrefillResult, EarlyDecode | None] | None:
    """On the prefill `state`: (result, the decode started on the announce, if one came); None
    when it failed before its result (the caller runs the whole-KV round instead)."""
    early = None
    stream = pd_client.prefill_stream(state, req, timeout_s)
    try:
        first = await unless_lost(state, anext(stream))
        if first.announce is not None:
            early = start_decode(req, first.announce)
            first = await unless_lost(state, anext(stream))
        return first.result, early
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
    return None


async def early_events(early: EarlyDecode, result: PrefillResult) -> AsyncIterator[TokenEvent | None]:
    """The layer-wise decode's events; None, and nothing after, when it failed before its first
    token (the caller then pulls the whole KV with the leased result)."""
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

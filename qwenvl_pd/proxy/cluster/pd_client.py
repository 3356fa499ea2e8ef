"""The two-hop request path as a client: Prefill on one instance, then Decode on another."""
import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from qwenvl_pd.protos.channel import GRPC_OPTIONS
from qwenvl_pd.messages import (DecodeRequest, KVHandle, PrefillRequest, PrefillResult, PrefillStreamEvent,
                                SampledToken, TokenEvent)
from qwenvl_pd.protos import auth, convert, qwenvl_pd_pb2 as pb, qwenvl_pd_pb2_grpc as pb_grpc


@dataclass
class Instance:
    address: str
    channel: grpc.aio.Channel

    @classmethod
    def connect(cls, address: str, secret: bytes = b"") -> "Instance":
        return cls(address, auth.channel(address, secret, GRPC_OPTIONS))


async def prefill(inst: Instance, req: PrefillRequest, timeout: float = 600) -> PrefillResult:
    reply = await pb_grpc.PrefillStub(inst.channel).Prefill(convert.to_proto(req), timeout=timeout)
    return convert.from_proto(reply)


def decode_request(req: PrefillRequest, result: PrefillResult) -> DecodeRequest:
    return DecodeRequest(request_id=req.request_id, handle=result.handle,
                         first_token=result.first_token, prompt_token_ids=req.prompt_token_ids,
                         prompt_len=result.prompt_len,
                         mrope_position_delta=result.mrope_position_delta, sampling=req.sampling)


async def prefill_stream(inst: Instance, req: PrefillRequest,
                         timeout: float = 600) -> AsyncIterator[PrefillStreamEvent]:
    """Layer-wise: the KV announce, then the result (cancelling the call aborts the prefill)."""
    call = pb_grpc.PrefillStub(inst.channel).PrefillStream(convert.to_proto(req), timeout=timeout)
    try:
        async for event in call:
            yield convert.from_proto(event)
    finally:
        call.cancel()


def layerwise_request(req: PrefillRequest, announce: KVHandle) -> DecodeRequest:
    """Decode starts on the announce; the first token and M-RoPE delta reach it through WatchKV."""
    return DecodeRequest(request_id=req.request_id, handle=announce, first_token=SampledToken(0),
                         prompt_token_ids=req.prompt_token_ids, prompt_len=announce.num_tokens,
                         mrope_position_delta=0, sampling=req.sampling, layerwise=True)


async def decode(inst: Instance, req: DecodeRequest) -> AsyncIterator[TokenEvent]:
    """Token events until (and including) the one with a finish_reason."""
    call = pb_grpc.DecodeStub(inst.channel).Decode(convert.to_proto(req))
    try:
        async for event in call:
            yield convert.from_proto(event)
    finally:
        call.cancel()  # a consumer that stops early cancels the stream, decode frees at once


async def generate(prefill_inst: Instance, decode_inst: Instance,
                   req: PrefillRequest) -> AsyncIterator[tuple[PrefillResult, TokenEvent | None]]:
    """(prefill result, None) first, then (prefill result, event) for each decode event."""
    result = await prefill(prefill_inst, req)
    yield result, None
    if result.finish_reason:
        return
    async for event in decode(decode_inst, decode_request(req, result)):
        yield result, event


async def generate_layerwise(prefill_inst: Instance, decode_inst: Instance,
                             req: PrefillRequest) -> AsyncIterator[tuple[PrefillResult, TokenEvent | None]]:
    """generate(), with decode started on the announce and reading while prefill computes."""
    async with contextlib.aclosing(prefill_stream(prefill_inst, req)) as events:
        announce = (await anext(events)).announce
        decoding = decode(decode_inst, layerwise_request(req, announce))
        first = asyncio.ensure_future(anext(decoding))  # the Decode call starts now
        try:
            result = (await anext(events)).result
            yield result, None
            if result.finish_reason:
                return
            yield result, await first
            async for event in decoding:
                yield result, event
        finally:
            first.cancel()
            await asyncio.gather(first, return_exceptions=True)
            await decoding.aclose()


async def abort(inst: Instance, service: str, request_id: str) -> bool:
    stub = pb_grpc.PrefillStub(inst.channel) if service == "prefill" else pb_grpc.DecodeStub(inst.channel)
    return (await stub.Abort(pb.AbortRequest(request_id=request_id), timeout=10)).found


async def load(inst: Instance, service: str):
    stub = pb_grpc.PrefillStub(inst.channel) if service == "prefill" else pb_grpc.DecodeStub(inst.channel)
    return convert.from_proto(await stub.GetLoad(pb.LoadRequest(), timeout=10))

"""The two-hop request path as a client: Prefill on one instance, then Decode on another."""
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from qwenvl_pd.protos.channel import GRPC_OPTIONS
from qwenvl_pd.messages import DecodeRequest, PrefillRequest, PrefillResult, TokenEvent
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


async def abort(inst: Instance, service: str, request_id: str) -> bool:
    stub = pb_grpc.PrefillStub(inst.channel) if service == "prefill" else pb_grpc.DecodeStub(inst.channel)
    return (await stub.Abort(pb.AbortRequest(request_id=request_id), timeout=10)).found


async def load(inst: Instance, service: str):
    stub = pb_grpc.PrefillStub(inst.channel) if service == "prefill" else pb_grpc.DecodeStub(inst.channel)
    return convert.from_proto(await stub.GetLoad(pb.LoadRequest(), timeout=10))

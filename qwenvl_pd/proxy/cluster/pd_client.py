"""The nodes' RPCs as the proxy calls them, typed messages in and out (protos/convert.py maps them
at this edge): Prefill and PrefillStream on a prefill, Decode on a decode, Encode and Release on
an encoder, Abort on prefill or decode and GetLoad on any. The request flow that strings them together is PDBackend's (backend.py)."""
from collections.abc import AsyncIterator

from qwenvl_pd.messages import (ENCODE, DecodeRequest, EmbeddingRelease, EncodeRequest, EncodeResult,
                                KVHandle, LoadReport, PrefillRequest, PrefillResult, PrefillStreamEvent,
                                SampledToken, TokenEvent)
from qwenvl_pd.protos import convert, qwenvl_pd_pb2 as pb, qwenvl_pd_pb2_grpc as pb_grpc
from qwenvl_pd.proxy.cluster.instance import Instance


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


async def encode(inst: Instance, req: EncodeRequest, timeout: float) -> EncodeResult:
    return convert.from_proto(await pb_grpc.EncodeStub(inst.channel).Encode(convert.to_proto(req), timeout=timeout))


async def release(inst: Instance, release: EmbeddingRelease) -> None:
    await pb_grpc.EncodeStub(inst.channel).Release(convert.to_proto(release), timeout=10)


def _stub(inst: Instance, service: str):
    stubs = {"prefill": pb_grpc.PrefillStub, "decode": pb_grpc.DecodeStub, ENCODE: pb_grpc.EncodeStub}
    return stubs[service](inst.channel)


async def abort(inst: Instance, service: str, request_id: str) -> bool:
    return (await _stub(inst, service).Abort(pb.AbortRequest(request_id=request_id), timeout=10)).found


async def load(inst: Instance, service: str) -> LoadReport:
    return convert.from_proto(await _stub(inst, service).GetLoad(pb.LoadRequest(), timeout=10))

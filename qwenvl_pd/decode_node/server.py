"""The decode node: pulls a prefilled request's KV over Mooncake, joins the running batch and
streams tokens. It never sees pixels, never runs the processor, never prefills."""
import asyncio
import logging
import time

import grpc
import torch

from qwenvl_pd.decode_node.layerwise import LayerwisePull
from qwenvl_pd.engine.block_manager import OutOfBlocks
from qwenvl_pd.node.host import NodeHost, run_node
from qwenvl_pd.protos.channel import CLIENT_OPTIONS
from qwenvl_pd.node.runtime import NodeConfig, Runtime
from qwenvl_pd.engine.commands import Abort, FreeBlocks, JoinPrefilled, QueueFull, ReserveBlocks, StepResult
from qwenvl_pd.engine.sequence import FinishReason, Sequence
from qwenvl_pd.kv_transfer.engine import TransferError, TransferTimeout
from qwenvl_pd.kv_transfer.heads import handle_problem
from qwenvl_pd.messages import DecodeRequest, SampledToken, TokenEvent
from qwenvl_pd.node.requests import check_grammar
from qwenvl_pd.node.runtime import load_report
from qwenvl_pd.protos import auth, convert, qwenvl_pd_pb2 as pb, qwenvl_pd_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


class DecodeService(pb_grpc.DecodeServicer):
    def __init__(self, runtime: Runtime):
        self.rt = runtime
        self.host = NodeHost(runtime, self._on_step)
        self.streams: dict[str, asyncio.Queue] = {}
        self.transfers = {"kv_transfers_total": 0, "kv_transfer_bytes_total": 0,
                          "kv_transfer_seconds_total": 0.0}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.pulling: dict[str, asyncio.Event] = {}  # set: aborted while its KV is in flight

    # ---- engine thread
    def _on_step(self, result: StepResult) -> None:
        for seq in result.sampled + result.handed_back:
            self.host.post(self._publish, seq.request_id, _event(seq))

    # ---- asyncio side
    async def _abort(self, request_id: str) -> bool:
        """End request_id's row now (its blocks freed) and publish its end."""
        seq = await self.host.settle(Abort(request_id))
        if seq is not None:
            self._publish(request_id, _event(seq))
        return seq is not None

    def _publish(self, request_id: str, event: TokenEvent) -> None:
        queue = self.streams.get(request_id)
        if queue is not None:
            queue.put_nowait(event)

    async def Decode(self, request, context):
        req = await self._validate(request, context)
        if req.request_id in self.streams:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"request {req.request_id} is in flight")
        queue: asyncio.Queue = asyncio.Queue()
        self.streams[req.request_id] = queue
        try:
            if req.layerwise:
                await LayerwisePull(self, req).run(context)
            elif unconfirmed := await (await self._pull_and_join(req, context)):
                await self._abort(req.request_id)  # end the row, free its blocks
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"KV lease of request {req.request_id} "
                                    f"on prefill {req.handle.instance_id} {unconfirmed}; not using the read")
            while True:
                event = await queue.get()
                yield convert.to_proto(event)
                if event.finish_reason:
                    return
        finally:
            self.streams.pop(req.request_id, None)
            # a client that went away (or any error) frees the blocks at once
            await asyncio.shield(self._abort(req.request_id))

    async def _validate(self, request, context) -> DecodeRequest:
        try:
            req: DecodeRequest = convert.from_proto(request)
            if req.sampling.structured_outputs is not None:  # compiling may take a while: off the loop
                await asyncio.to_thread(check_grammar, self.rt.engine.grammars, req.sampling)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        await self._check_origin(req, context)
        # refused before any block is allocated or read: a layout the heads cannot map between
        mismatch = (req.handle.fingerprint.mismatch(self.rt.fingerprint, names=("prefill", "decode"))
                    or handle_problem(req.handle, self.rt.region))
        if mismatch:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"KV layout mismatch: {mismatch}")
        if req.handle.lease_expires_unix_ms and req.handle.lease_expires_unix_ms < time.time() * 1000:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"KV lease of request {req.request_id} expired on {req.handle.instance_id}")
        return req

    async def _check_origin(self, req: DecodeRequest, context) -> None:
        """With the cluster secret a handle must carry its prefill's signature and the address
        Release confirms the lease at; always, it must describe this request's prompt."""
        h, secret = req.handle, self.rt.cfg.cluster_secret
        if secret and not auth.is_signed(h, secret):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"the KV handle of request {req.request_id} was not signed by a prefill "
                                "of this cluster")
        if secret and not h.control_address:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "the KV handle names no prefill to "
                                "release it at, so its lease cannot be confirmed")
        if h.num_tokens != req.prompt_len:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"the handle holds {h.num_tokens} tokens, the prompt has {req.prompt_len}")

    async def _pull_and_join(self, req: DecodeRequest, context) -> asyncio.Task:
        """Read the KV into fresh blocks and join the batch -> the Release of the prefill's lease,
        still running: the row decodes meanwhile, its tokens wait in the stream's queue."""
        blocks = await self._allocate_or_refuse(len(req.handle.block_ids), context)
        await self._read(req, blocks, context)
        # the lease still held at Release means it held for the whole read: the bytes are that
        # request's, not a restarted instance's or another request's that reused the blocks
        release = asyncio.ensure_future(self._release(req.handle, req.request_id))
        if self.pulling.pop(req.request_id).is_set():  # aborted while the KV was in flight
            await self.host.settle(FreeBlocks(blocks))
            self.streams[req.request_id].put_nowait(TokenEvent(finish_reason="abort"))
            return release
        await self.host.settle(JoinPrefilled(self._sequence(req, blocks)))
        return release

    async def _allocate_or_refuse(self, n: int, context) -> list[int]:
        try:
            return await self._allocate(n)
        except OutOfBlocks:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "decode is out of KV blocks")
        except QueueFull as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"decode {self.rt.instance_id} has {e}")

    async def _read(self, req: DecodeRequest, blocks: list[int], context) -> None:
        h, start = req.handle, time.perf_counter()
        self.pulling[req.request_id] = asyncio.Event()
        # every tensor-parallel rank reads its own heads; rank 0 counts its bytes
        read = asyncio.ensure_future(self.rt.kv.pull_async(h, blocks))
        try:
            nbytes = await asyncio.shield(read)
        except (TransferError, ValueError) as e:
            self.pulling.pop(req.request_id, None)
            await self._free_after(e, blocks)
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"KV read from prefill {h.instance_id} ({h.transfer_address}) failed: {e}")
        except asyncio.CancelledError:  # the read may still be writing: free once it has settled
            self.pulling.pop(req.request_id, None)
            read.add_done_callback(lambda t: self._free_when_settled(t, blocks))
            raise
        self._count(nbytes, time.perf_counter() - start)

    def _free_when_settled(self, read: asyncio.Future, blocks: list[int]) -> None:
        error = None if read.cancelled() else read.exception()
        if isinstance(error, TransferTimeout):
            error.settled.add_done_callback(lambda _: self._free_later(blocks))
        else:
            self._free_later(blocks)

    async def _allocate(self, n: int) -> list[int]:
        """n blocks from the engine thread; a stream cancelled meanwhile gives them back once
        the allocation has happened (it happens anyway: the engine thread does not see the
        cancel)."""
        done = self.host.send(ReserveBlocks(n, self.rt.cfg.max_queued_requests))
        try:
            return await asyncio.shield(asyncio.wrap_future(done))
        except asyncio.CancelledError:
            done.add_done_callback(lambda f: f.exception() is None and self._free_later(f.result()))
            raise

    def _free_later(self, blocks: list[int]) -> None:
        self.host.send(FreeBlocks(blocks))

    async def _free_after(self, error: TransferError, blocks: list[int]) -> None:
        # a timed-out read may still land in these blocks: free them only once it has settled
        if isinstance(error, TransferTimeout):
            error.settled.add_done_callback(lambda _: self._free_later(blocks))
        else:
            await self.host.settle(FreeBlocks(blocks))

    def _sequence(self, req: DecodeRequest, blocks: list[int]) -> Sequence:
        seq = Sequence(req.request_id, list(req.prompt_token_ids), torch.zeros(3, 0, dtype=torch.long),
                       req.mrope_position_delta, req.sampling)
        seq.token_ids.append(req.first_token.token_id)
        seq.block_ids = list(blocks)
        return seq

    def _count(self, nbytes: int, seconds: float) -> None:
        self.transfers["kv_transfers_total"] += 1
        self.transfers["kv_transfer_bytes_total"] += nbytes
        self.transfers["kv_transfer_seconds_total"] += seconds

    async def _release(self, h, request_id: str) -> str:
        """Tell prefill the blocks are pulled; "" when it confirms it leased them to us until
        now, else why not. A Release that fails cannot confirm: the lease may have expired and
        the blocks gone to another request while we read."""
        if not h.control_address:
            return ""  # only without the cluster secret: nothing to confirm with
        channel = self.control_channel(h.control_address)
        request = pb.ReleaseRequest(request_id=request_id, instance_id=h.instance_id)
        try:
            released = (await pb_grpc.PrefillStub(channel).Release(request, timeout=5)).released
        except grpc.RpcError as e:
            log.warning("release of %s on %s failed: %s", request_id, h.control_address, e.code())
            return f"could not be confirmed (Release at {h.control_address}: {e.code().name})"
        return "" if released else "was no longer held (expired, aborted or restarted)"

    def control_channel(self, address: str) -> grpc.aio.Channel:
        """The channel to a prefill's gRPC address, opened once: Release and WatchKV share it."""
        if address not in self._channels:
            self._channels[address] = auth.channel(address, self.rt.cfg.cluster_secret, CLIENT_OPTIONS)
        return self._channels[address]

    async def Abort(self, request, context):
        pulling = self.pulling.get(request.request_id)
        if pulling is not None:
            pulling.set()
            return pb.AbortResponse(found=True)
        return pb.AbortResponse(found=await self._abort(request.request_id))

    async def GetLoad(self, request, context):
        return convert.to_proto(load_report(self.rt, "decode", **self.transfers))


def _event(seq: Sequence) -> TokenEvent:
    reason = seq.finish_reason.value if seq.finish_reason else ""
    token = None
    if seq.finish_reason not in (FinishReason.ABORT, FinishReason.PREEMPTED):
        logprob, top = seq.logprobs[-1] if seq.logprobs else (None, ())
        token = SampledToken(seq.token_ids[-1], logprob, tuple(top))
    return TokenEvent(token=token, finish_reason=reason, num_prompt_tokens=seq.prompt_len,
                      num_output_tokens=seq.num_output)


def main(cfg: NodeConfig) -> int:
    return run_node(cfg, DecodeService, pb_grpc.add_DecodeServicer_to_server)

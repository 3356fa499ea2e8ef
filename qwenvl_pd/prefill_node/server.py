"""The prefill node: vision encoder + prompt prefill; holds the KV under a lease for decode."""
import asyncio
import logging
import time

import grpc

from qwenvl_pd.node.host import NodeHost, run_node
from qwenvl_pd.node.requests import prompt_logprobs, sequence_from_request
from qwenvl_pd.node.runtime import NodeConfig, QueueFull, Runtime, check_queue, load_report
from qwenvl_pd.engine.sequence import FinishReason, Sequence
from qwenvl_pd.kv_transfer.handle import KVHandle
from qwenvl_pd.messages import PrefillRequest, PrefillResult, SampledToken
from qwenvl_pd.model.inputs import InputError
from qwenvl_pd.prefill_node.leases import LeaseTable, lease_seconds
from qwenvl_pd.protos import auth, convert, qwenvl_pd_pb2 as pb, qwenvl_pd_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


class PrefillService(pb_grpc.PrefillServicer):
    def __init__(self, runtime: Runtime):
        self.rt = runtime
        self.leases = LeaseTable()
        self.host = NodeHost(runtime, self._on_tokens, self._expire_leases)
        self.waiters: dict[str, asyncio.Future] = {}
        self.seqs: dict[str, Sequence] = {}  # engine thread: live prefills by request id
        self.lease_seconds: dict[str, float] = {}  # set before a sequence reaches the engine

    # ---- engine thread
    def _on_tokens(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            if seq.finished:
                self.seqs.pop(seq.request_id, None)
                if seq.finish_reason == FinishReason.PREFILLED:
                    self.leases.add(seq.request_id, seq.block_ids,
                                    self.lease_seconds.get(seq.request_id, self.rt.cfg.lease_seconds))
                self.host.post(self._resolve, seq.request_id, seq)

    def _expire_leases(self) -> None:
        for blocks in self.leases.pop_expired():
            self.rt.engine.blocks.free(blocks)

    def _add(self, seq: Sequence) -> None:
        if seq.request_id in self.seqs or seq.request_id in self.leases:
            raise KeyError(seq.request_id)
        check_queue(self.rt)
        self.seqs[seq.request_id] = seq
        self.rt.engine.add(seq)

    def _abort(self, request_id: str) -> bool:
        seq = self.seqs.pop(request_id, None)
        if seq is not None:
            self.rt.engine.finish(seq, FinishReason.ABORT)
            self.host.post(self._resolve, request_id, seq)
            return True
        return self._free_lease(request_id)

    def _release(self, request_id: str, instance_id: str) -> bool:
        if instance_id and instance_id != self.rt.instance_id:
            return False
        return self._free_lease(request_id)

    def _free_lease(self, request_id: str) -> bool:
        blocks = self.leases.pop(request_id)
        if blocks is not None:
            self.rt.engine.blocks.free(blocks)
        return blocks is not None

    # ---- asyncio side
    def _resolve(self, request_id: str, seq: Sequence) -> None:
        fut = self.waiters.pop(request_id, None)
        if fut is not None and not fut.done():
            fut.set_result(seq)

    async def Prefill(self, request, context):
        try:
            req: PrefillRequest = convert.from_proto(request)
            seq = await asyncio.to_thread(sequence_from_request, self.rt.inputs, req, self.rt.cfg.max_model_len,
                                          self.rt.engine.grammars)
        except (ValueError, InputError) as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if req.request_id in self.waiters:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"request {req.request_id} is in flight")
        fut = asyncio.get_running_loop().create_future()
        self.waiters[req.request_id] = fut
        self.lease_seconds[req.request_id] = lease_seconds(req.lease_ms, self.rt.cfg.lease_seconds)
        try:
            seq = await self._run(seq, fut, context)
        finally:
            self.waiters.pop(req.request_id, None)
            self.lease_seconds.pop(req.request_id, None)
        if seq.finish_reason == FinishReason.ABORT:
            await context.abort(grpc.StatusCode.CANCELLED, f"request {req.request_id} aborted")
        lease_s = lease_seconds(req.lease_ms, self.rt.cfg.lease_seconds)
        return convert.to_proto(self._result(seq, lease_s))

    async def _run(self, seq: Sequence, fut: asyncio.Future, context) -> Sequence:
        try:
            await self.host.call(lambda: self._add(seq))  # skipped if the caller is gone by then
            return await fut
        except KeyError:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS,
                                f"request {seq.request_id} holds KV not yet released")
        except QueueFull as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except asyncio.CancelledError:  # the proxy gave up: free at once (a no-op if never added)
            await self.host.settle(lambda: self._abort(seq.request_id))
            raise

    def _result(self, seq: Sequence, lease_s: float) -> PrefillResult:
        logprob, top = seq.logprobs[0] if seq.logprobs else (None, ())
        token = SampledToken(seq.output_ids[0], logprob, tuple(top))
        result = dict(request_id=seq.request_id, first_token=token, mrope_position_delta=seq.mrope_delta,
                      prompt_len=seq.prompt_len, num_cached_tokens=seq.num_cached,
                      prompt_logprobs=prompt_logprobs(seq))
        if seq.finish_reason != FinishReason.PREFILLED:
            return PrefillResult(**result, finish_reason=seq.finish_reason.value)
        return PrefillResult(**result, handle=self._handle(seq, lease_s))

    def _handle(self, seq: Sequence, lease_s: float) -> KVHandle:
        handle = self._unsigned_handle(seq, lease_s)
        secret = self.rt.cfg.cluster_secret
        return auth.sign(handle, secret) if secret else handle

    def _unsigned_handle(self, seq: Sequence, lease_s: float) -> KVHandle:
        lease_ms = int((time.time() + lease_s) * 1000)
        return KVHandle(
            instance_id=self.rt.instance_id, transfer_address=self.rt.transfer.session_id,
            kv_base_ptr=self.rt.region.base, block_bytes=self.rt.region.block_bytes,
            region_num_blocks=self.rt.region.num_blocks, block_ids=tuple(seq.block_ids),
            num_tokens=seq.prompt_len, fingerprint=self.rt.fingerprint,
            lease_expires_unix_ms=lease_ms, control_address=f"{self.rt.cfg.host}:{self.rt.cfg.port}",
            rank_segments=self.rt.kv.segments[1:])

    async def Release(self, request, context):
        released = await self.host.settle(lambda: self._release(request.request_id, request.instance_id))
        return pb.ReleaseResponse(released=released)

    async def Abort(self, request, context):
        found = await self.host.settle(lambda: self._abort(request.request_id))
        return pb.AbortResponse(found=found)

    async def GetLoad(self, request, context):
        return convert.to_proto(load_report(self.rt, "prefill"))

    async def GetModelInfo(self, request, context):
        return convert.to_proto(self.rt.model_info())


def main(cfg: NodeConfig) -> int:
    return run_node(cfg, PrefillService, pb_grpc.add_PrefillServicer_to_server)

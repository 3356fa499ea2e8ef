"""The prefill node: vision encoder + prompt prefill; holds the KV under a lease for decode."""
import asyncio
import dataclasses
import logging
import time

import grpc

from qwenvl_pd.node.host import NodeHost, run_node
from qwenvl_pd.node.requests import sequence_from_request, token_event
from qwenvl_pd.node.runtime import NodeConfig, Runtime, load_report
from qwenvl_pd.engine.commands import Abort, Add, DuplicateRequest, FreeBlocks, QueueFull, StepResult
from qwenvl_pd.finish_reason import FinishReason
from qwenvl_pd.engine.sequence import Sequence
from qwenvl_pd.kv_transfer.handle import KVHandle
from qwenvl_pd.engine.kv_streams import LayerProgress
from qwenvl_pd.messages import PrefillRequest, PrefillResult, PrefillStreamEvent
from qwenvl_pd.model.inputs import InputError
from qwenvl_pd.model.vision_fingerprint import vision_fingerprint
from qwenvl_pd.prefill_node.embedding_reader import (UNAVAILABLE, EmbeddingReader, EmbeddingRefused,
                                                     EmbeddingUnavailable,
                                                     ReaderConfig)
from qwenvl_pd.prefill_node.kv_watch import Watched
from qwenvl_pd.prefill_node.leases import LeaseTable, lease_seconds
from qwenvl_pd.protos import auth, convert, qwenvl_pd_pb2 as pb, qwenvl_pd_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
LEASE_CHECK_S = 0.05  # how often expired leases are looked for


class PrefillService(pb_grpc.PrefillServicer):
    def __init__(self, runtime: Runtime):
        self.rt = runtime
        self.leases = LeaseTable()
        # a drain waits for running prefills and for the leases decode may still read
        self.host = NodeHost(runtime, self._on_step, lambda: len(self.waiters) + len(self.leases))
        self.waiters: dict[str, asyncio.Future] = {}
        self.lease_seconds: dict[str, float] = {}  # set before a sequence reaches the engine
        self.watched: dict[str, Watched] = {}  # layer-wise requests, until their lease is gone
        self.streams = (runtime.engine.stream_layers(runtime.cfg.kv_layer_group, self._on_layers)
                        if runtime.cfg.kv_layer_group else None)
        self._expiry = asyncio.ensure_future(self._expire_leases())
        self.embeddings = EmbeddingReader(reader_config(runtime), runtime.transfer,
                                          runtime.engine.encoder_cache.get, _store_get(runtime.cfg))

    # ---- engine thread
    def _on_step(self, result: StepResult) -> None:
        for seq in result.finished:
            self.host.post(self._finished, seq)

    def _on_layers(self, progress: LayerProgress) -> None:
        self.host.post(self._progress, progress)

    # ---- asyncio side
    def _finished(self, seq: Sequence) -> None:
        """A prefill ended: its blocks go under a lease if decode is to read them."""
        if seq.finish_reason == FinishReason.PREFILLED:
            self.leases.add(seq.request_id, seq.block_ids,
                            self.lease_seconds.get(seq.request_id, self.rt.cfg.lease_seconds))
        self._resolve(seq.request_id, seq)

    async def _expire_leases(self) -> None:
        while True:
            await asyncio.sleep(LEASE_CHECK_S)
            for request_id, blocks in self.leases.pop_expired():
                self.host.send(FreeBlocks(blocks))
                self.watched.pop(request_id, None)

    async def _abort(self, request_id: str) -> bool:
        seq = await self.host.settle(Abort(request_id))
        if seq is not None:
            self._resolve(request_id, seq)
            return True
        return await self._free_lease(request_id)

    async def _release(self, request_id: str, instance_id: str) -> bool:
        if instance_id and instance_id != self.rt.instance_id:
            return False
        return await self._free_lease(request_id)

    async def _free_lease(self, request_id: str) -> bool:
        """The lease ends here and now; its blocks are freed at the engine's next step boundary.
        Waiting for that would hold Release for as long as the step runs (tens of seconds for an
        image prompt on one core), and decode drops a read it cannot confirm in time."""
        blocks = self.leases.pop(request_id)
        if blocks is None:
            return False
        self.watched.pop(request_id, None)
        self.host.send(FreeBlocks(blocks))
        return True

    def _resolve(self, request_id: str, seq: Sequence) -> None:
        fut = self.waiters.pop(request_id, None)
        if fut is not None and not fut.done():
            fut.set_result(seq)

    def _progress(self, progress: LayerProgress) -> None:
        watched = self.watched.get(progress.request_id)
        if watched is not None:
            watched.update(progress)

    async def Prefill(self, request, context):
        req, seq = await self._parse(request, context)
        fut = self._wait_for(req)
        try:
            seq = await self._run(seq, fut, context)
        finally:
            self._done_waiting(req.request_id)
        return convert.to_proto(await self._answer(req, seq, context))

    async def _parse(self, request, context) -> tuple[PrefillRequest, Sequence]:
        await self.host.refuse_if_draining(context)
        try:
            req: PrefillRequest = convert.from_proto(request)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        embeds = await self._embeddings(req, context)
        try:
            seq = await asyncio.to_thread(sequence_from_request, self.rt.inputs, req, self.rt.max_model_len,
                                          self.rt.engine.grammars, embeds)
        except (ValueError, InputError) as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if req.request_id in self.waiters:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"request {req.request_id} is in flight")
        return req, seq

    async def _embeddings(self, req: PrefillRequest, context) -> list:
        """Items sent as embedding handles, read (None for items sent as bytes); one that cannot
        be had fails the request so that the proxy resends it with the media bytes."""
        try:
            return await self.embeddings.read(req.media)
        except EmbeddingUnavailable as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, UNAVAILABLE + str(e))
        except EmbeddingRefused as e:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(e))

    def _wait_for(self, req: PrefillRequest) -> asyncio.Future:
        fut = self.waiters[req.request_id] = asyncio.get_running_loop().create_future()
        self.lease_seconds[req.request_id] = lease_seconds(req.lease_ms, self.rt.cfg.lease_seconds)
        return fut

    def _done_waiting(self, request_id: str) -> None:
        self.waiters.pop(request_id, None)
        self.lease_seconds.pop(request_id, None)

    async def _answer(self, req: PrefillRequest, seq: Sequence, context) -> PrefillResult:
        if seq.finish_reason == FinishReason.ABORT:
            await context.abort(grpc.StatusCode.CANCELLED, f"request {req.request_id} aborted")
        return self._result(seq, lease_seconds(req.lease_ms, self.rt.cfg.lease_seconds))

    async def PrefillStream(self, request, context):
        """Layer-wise: the announce once the blocks are allocated, then the result."""
        if self.streams is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"layer-wise KV is off on prefill {self.rt.instance_id} (--kv-layer-group 0)")
        req, seq = await self._parse(request, context)
        if req.request_id in self.watched:  # leased, its KV perhaps still being read
            await context.abort(grpc.StatusCode.ALREADY_EXISTS,
                                f"request {req.request_id} holds KV not yet released")
        fut, watched = self._wait_for(req), Watched()
        self.watched[req.request_id] = watched
        result, run = None, asyncio.ensure_future(self._run(seq, fut, context, layerwise=True))
        try:
            await asyncio.wait([run, watched.announced], return_when=asyncio.FIRST_COMPLETED)
            if watched.announced.done():
                yield convert.to_proto(PrefillStreamEvent(announce=self._announce(seq, watched.announced.result())))
            result = await self._answer(req, await run, context)
            watched.finish(result)
            yield convert.to_proto(PrefillStreamEvent(result=result))
        finally:
            run.cancel()  # the caller went away: _run aborts the sequence (a no-op once done)
            self._done_waiting(req.request_id)
            watched.finish(None, "the prefill stream ended before its result")
            if result is None or result.handle is None:  # no lease: nothing left to read
                self.watched.pop(req.request_id, None)

    def _announce(self, seq: Sequence, block_ids: tuple[int, ...]) -> KVHandle:
        return self._signed(dataclasses.replace(self._unsigned_handle(seq, 0), block_ids=block_ids,
                                                lease_expires_unix_ms=0))  # no lease until the prefill ends

    async def WatchKV(self, request, context):
        rid = request.request_id
        watched = self.watched.get(rid)
        if watched is None or (request.instance_id and request.instance_id != self.rt.instance_id):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"request {rid} streams no KV on prefill "
                                f"{self.rt.instance_id} (finished, aborted, released or never here)")
        async for progress in watched.changes():
            yield convert.to_proto(progress)
        if watched.end:
            await context.abort(grpc.StatusCode.ABORTED, f"prefill of request {rid} on "
                                f"{self.rt.instance_id} ended without a result: {watched.end}")

    async def _run(self, seq: Sequence, fut: asyncio.Future, context, layerwise: bool = False) -> Sequence:
        try:
            if seq.request_id in self.leases:
                raise DuplicateRequest(seq.request_id)
            # skipped if the caller is gone by then
            await self.host.call(Add(seq, self.rt.cfg.max_queued_requests, layerwise))
            return await fut
        except DuplicateRequest:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS,
                                f"request {seq.request_id} holds KV not yet released")
        except QueueFull as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"prefill {self.rt.instance_id} has {e}")
        except asyncio.CancelledError:  # the proxy gave up: free at once (a no-op if never added)
            await asyncio.shield(self._abort(seq.request_id))
            raise

    def _result(self, seq: Sequence, lease_s: float) -> PrefillResult:
        event = token_event(seq, first=True)
        result = dict(request_id=seq.request_id, first_token=event.token, mrope_position_delta=seq.mrope_delta,
                      prompt_len=seq.prompt_len, num_cached_tokens=event.num_cached_tokens,
                      prompt_logprobs=event.prompt_logprobs)
        if seq.finish_reason != FinishReason.PREFILLED:
            return PrefillResult(**result, finish_reason=seq.finish_reason.value)
        return PrefillResult(**result, handle=self._handle(seq, lease_s))

    def _handle(self, seq: Sequence, lease_s: float) -> KVHandle:
        return self._signed(self._unsigned_handle(seq, lease_s))

    def _signed(self, handle: KVHandle) -> KVHandle:
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
            rank_segments=self.rt.kv.segments[1:], request_id=seq.request_id)

    async def Release(self, request, context):
        return pb.ReleaseResponse(released=await self._release(request.request_id, request.instance_id))

    async def Abort(self, request, context):
        return pb.AbortResponse(found=await self._abort(request.request_id))

    async def GetLoad(self, request, context):
        read = self.embeddings.counters
        return convert.to_proto(load_report(self.rt, "prefill", embedding_reads=read.reads,
                                            embedding_read_bytes=read.read_bytes,
                                            embedding_read_failures=read.failures))

    async def GetModelInfo(self, request, context):
        return convert.to_proto(self.rt.model_info())


def reader_config(rt: Runtime) -> ReaderConfig:
    """Computed once at start: handles made by other vision weights are refused."""
    mc = rt.model_config
    return ReaderConfig(vision_fingerprint(mc.family, mc.vision, rt.model.vision_tower()),
                        mc.vision.out_hidden_size, mc.vision.spatial_merge_size, rt.cfg.transfer_timeout_s,
                        rt.cfg.embedding_read_buffer_mib << 20, rt.cfg.cluster_secret,
                        rt.cfg.allowed_encoders)


def _store_get(cfg: NodeConfig):
    if not cfg.embedding_store:
        return None
    from qwenvl_pd.kv_transfer.embedding_store import EmbeddingStore
    # a reader lends the store no memory: nothing is placed on a prefill
    return EmbeddingStore(cfg.embedding_store, cfg.host, segment_bytes=0,
                          buffer_bytes=cfg.embedding_read_buffer_mib << 20, protocol=cfg.transfer_protocol,
                          device=cfg.transfer_device).get


def main(cfg: NodeConfig) -> int:
    return run_node(cfg, PrefillService, pb_grpc.add_PrefillServicer_to_server)

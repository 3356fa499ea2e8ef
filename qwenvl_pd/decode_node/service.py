"""The decode node: pulls a prefilled request's KV over Mooncake, joins the running batch and
streams tokens. It never sees pixels, never runs the processor, never prefills."""
import asyncio
import contextlib
import dataclasses
import logging
import time

import grpc

from qwenvl_pd.decode_node.kv_pull import KVPull, TransferStats
from qwenvl_pd.decode_node.layerwise_pull import LayerwisePull
from qwenvl_pd.decode_node.prefill_peers import PrefillPeers
from qwenvl_pd.decode_node.prefill_allowlist import handle_addresses, prefill_allowlist
from qwenvl_pd.engine.block_manager import OutOfBlocks
from qwenvl_pd.engine.commands import Abort, QueueFull, StepResult
from qwenvl_pd.kv_transfer.transfer_engine import TransferError
from qwenvl_pd.kv_transfer.heads import handle_problem
from qwenvl_pd.messages import DecodeRequest, TokenEvent
from qwenvl_pd.node.host import NodeHost, run_node
from qwenvl_pd.node.requests import check_grammar, token_event
from qwenvl_pd.node.runtime import NodeConfig, Runtime, load_report
from qwenvl_pd.protos import auth, convert, qwenvl_pd_pb2 as pb, qwenvl_pd_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


class DecodeService(pb_grpc.DecodeServicer):
    def __init__(self, runtime: Runtime):
        self.rt = runtime
        self.host = NodeHost(runtime, self._on_step, in_flight=lambda: len(self.streams))
        self.streams: dict[str, asyncio.Queue] = {}  # a request's events, until its stream ends
        self.pulls: dict[str, KVPull] = {}  # requests whose KV is being read
        self.peers = PrefillPeers(runtime.cfg.cluster_secret)
        self.allowed = prefill_allowlist(runtime.cfg.allowed_prefills)
        if not (self.allowed or runtime.cfg.cluster_secret):
            log.warning("no cluster secret and no --allowed-prefills: this decode reads KV from any "
                        "prefill address a caller names")
        self.stats = TransferStats()

    # ---- engine thread
    def _on_step(self, result: StepResult) -> None:
        for seq in result.sampled + result.handed_back:
            self.host.post(self._publish, seq.request_id, token_event(seq))

    # ---- asyncio side
    def _publish(self, request_id: str, event: TokenEvent) -> None:
        queue = self.streams.get(request_id)
        if queue is not None:
            queue.put_nowait(event)

    async def _abort(self, request_id: str) -> bool:
        """End request_id's row now (its blocks freed) and publish its end."""
        seq = await self.host.settle(Abort(request_id))
        if seq is not None:
            self._publish(request_id, token_event(seq))
        return seq is not None

    async def Decode(self, request, context):
        await self.host.refuse_if_draining(context)
        req = await self._validate(request, context)
        if req.request_id in self.streams:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"request {req.request_id} is in flight")
        queue: asyncio.Queue = asyncio.Queue()
        self.streams[req.request_id] = queue
        try:
            await self._pull(req, context)
            while True:
                event = await queue.get()
                yield convert.to_proto(event)
                if event.finish_reason:
                    return
        finally:
            self.streams.pop(req.request_id, None)
            # a client that went away (or any error) frees the blocks at once
            await asyncio.shield(self._abort(req.request_id))

    async def _pull(self, req: DecodeRequest, context) -> None:
        """Reserve, read and join (or end the stream at once); either path, one KVPull."""
        pull = KVPull(self.host, self.peers, self.stats, req)
        await self._reserve(pull, context)
        if req.layerwise:
            layerwise = LayerwisePull(pull, self.rt.cfg.transfer_timeout_s)
            with self._pulling(pull):
                result = await layerwise.follow(context)
            end = await layerwise.finish(result, context)
            if end is not None:
                self.streams[req.request_id].put_nowait(end)
        elif unconfirmed := await (await self._pull_and_join(pull, context)):
            await self._abort(req.request_id)  # end the row, free its blocks
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"KV lease of request {req.request_id} "
                                f"on prefill {req.handle.instance_id} {unconfirmed}; not using the read")

    async def _reserve(self, pull: KVPull, context) -> None:
        try:
            await pull.reserve()
        except OutOfBlocks as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"decode is out of KV blocks: {e}")
        except QueueFull as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"decode {self.rt.instance_id} has {e}")

    @contextlib.contextmanager
    def _pulling(self, pull: KVPull):
        """While its KV is in flight an Abort marks the pull, which ends it."""
        self.pulls[pull.req.request_id] = pull
        try:
            yield
        finally:
            self.pulls.pop(pull.req.request_id, None)

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
        if h.request_id != req.request_id and (secret or h.request_id):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"the KV handle was issued for request "
                                f"{h.request_id!r}, not {req.request_id!r}")
        if secret and not h.control_address:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "the KV handle names no prefill to "
                                "release it at, so its lease cannot be confirmed")
        if self.allowed and (why := await self.allowed.refusal("the KV handle", handle_addresses(h))):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, why)
        if h.num_tokens != req.prompt_len:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"the handle holds {h.num_tokens} tokens, the prompt has {req.prompt_len}")

    async def _pull_and_join(self, pull: KVPull, context) -> asyncio.Task:
        """Read the whole KV and join the batch -> the Release of the prefill's lease, still
        running: the row decodes meanwhile, its tokens wait in the stream's queue."""
        req = pull.req
        with self._pulling(pull):
            await self._read(pull, context)
        # the lease still held at Release means it held for the whole read: the bytes are that
        # request's, not a restarted instance's or another request's that reused the blocks
        release = asyncio.ensure_future(pull.release(req.handle))
        if pull.aborted.is_set():  # aborted while the KV was in flight
            await pull.free()
            self.streams[req.request_id].put_nowait(TokenEvent(finish_reason="abort"))
            return release
        await pull.join(req.first_token, req.mrope_position_delta)
        return release

    async def _read(self, pull: KVPull, context) -> None:
        h = pull.req.handle
        try:
            await pull.read()
        except (TransferError, ValueError) as e:
            await pull.free()
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"KV read from prefill {h.instance_id} ({h.transfer_address}) failed: {e}")
        except asyncio.CancelledError:  # the read may still be writing: freed once it has settled
            await pull.free()
            raise
        pull.landed()

    async def Abort(self, request, context):
        pull = self.pulls.get(request.request_id)
        if pull is not None:
            pull.abort()
            return pb.AbortResponse(found=True)
        return pb.AbortResponse(found=await self._abort(request.request_id))

    async def GetLoad(self, request, context):
        return convert.to_proto(load_report(self.rt, "decode", **dataclasses.asdict(self.stats)))


def main(cfg: NodeConfig) -> int:
    return run_node(cfg, DecodeService, pb_grpc.add_DecodeServicer_to_server)

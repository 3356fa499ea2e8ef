"""Decode's layer-wise KV path: blocks allocated on prefill's announce, each group of layers read
while prefill computes the later ones (WatchKV), then Release and join with the first token from
prefill's final result. The whole-KV path (DecodeService._pull_and_join) stays the default.

Guarantees as in the whole path: a local block is freed only once no read can still land in it
(a timed-out read is waited for); the bytes are used only if prefill confirms at Release that it
held the blocks for this request throughout (the lease follows the running sequence without a
gap), and a prefill that reports nothing for the transfer timeout fails the stream UNAVAILABLE.
"""
from __future__ import annotations

import asyncio
import dataclasses
import time

import grpc

from qwenvl_pd.engine.block_manager import OutOfBlocks
from qwenvl_pd.kv_transfer.cursor import Read, ReadCursor
from qwenvl_pd.kv_transfer.engine import TransferError
from qwenvl_pd.messages import DecodeRequest, KVProgress, PrefillResult, TokenEvent
from qwenvl_pd.engine.commands import JoinPrefilled, QueueFull
from qwenvl_pd.protos import convert, qwenvl_pd_pb2 as pb, qwenvl_pd_pb2_grpc as pb_grpc


class StreamFailed(Exception):
    """The layer-wise read cannot finish: the stream ends UNAVAILABLE with this message."""


class LayerwisePull:
    def __init__(self, service, req: DecodeRequest):
        self.svc, self.req, self.h = service, req, req.handle
        self.blocks: list[int] = []
        self.reading: asyncio.Future | None = None  # the read in flight, if any

    async def run(self, context) -> None:
        """Allocate, read as prefill computes, Release, then join (or end the stream)."""
        rid, svc = self.req.request_id, self.svc
        try:
            self.blocks = await svc._allocate(len(self.h.block_ids))
        except OutOfBlocks as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e) or "decode is out of KV blocks")
        except QueueFull as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"decode {svc.rt.instance_id} has {e}")
        aborted = svc.pulling[rid] = asyncio.Event()
        try:
            result = await self._follow(aborted)
        except StreamFailed as e:
            self._free()
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        except BaseException:  # cancelled (the stream went away) or a bug: never leak the blocks
            self._free()
            raise
        finally:
            svc.pulling.pop(rid, None)
        await self._finish(result, aborted, context)

    async def _finish(self, result: PrefillResult | None, aborted: asyncio.Event, context) -> None:
        svc, rid = self.svc, self.req.request_id
        if result is None or result.finish_reason:  # aborted, or the first token ended it: no lease
            self._free()
            svc.streams[rid].put_nowait(TokenEvent(finish_reason=result.finish_reason if result else "abort"))
            return
        svc.transfers["kv_transfers_total"] += 1  # its bytes and seconds count as each group lands
        try:
            unconfirmed = await svc._release(result.handle, rid)
        except asyncio.CancelledError:
            self._free()
            raise
        if unconfirmed or aborted.is_set():
            self._free()
            if unconfirmed:
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"KV lease of request {rid} on "
                                    f"prefill {self.h.instance_id} {unconfirmed}; not using the read")
            svc.streams[rid].put_nowait(TokenEvent(finish_reason="abort"))
            return
        req = dataclasses.replace(self.req, first_token=result.first_token,
                                  mrope_position_delta=result.mrope_position_delta)
        await svc.host.settle(JoinPrefilled(svc._sequence(req, self.blocks)))

    async def _follow(self, aborted: asyncio.Event) -> PrefillResult | None:
        """Read every group prefill reports until its result; None when aborted meanwhile."""
        cursor = ReadCursor(self.h.fingerprint.num_layers, self.h.fingerprint.block_size,
                            self.req.prompt_len, len(self.h.block_ids))
        call = pb_grpc.PrefillStub(self.svc.control_channel(self.h.control_address)).WatchKV(
            pb.WatchKVRequest(request_id=self.req.request_id, instance_id=self.h.instance_id))
        try:
            while (progress := await self._next(call, aborted)) is not None:
                for read in cursor.advance(progress.tokens_ready, progress.chunk_tokens,
                                           progress.layers_ready):
                    await self._read(read)
                if progress.result is not None:
                    if not cursor.complete and not progress.result.finish_reason:
                        raise StreamFailed(f"prefill {self.h.instance_id} ended before all KV was ready")
                    return progress.result
            return None
        finally:
            call.cancel()

    async def _next(self, call, aborted: asyncio.Event) -> KVProgress | None:
        """The next progress report; None once aborted (Abort between layers)."""
        timeout = self.svc.rt.cfg.transfer_timeout_s
        read, abort = asyncio.ensure_future(call.read()), asyncio.ensure_future(aborted.wait())
        try:
            await asyncio.wait([read, abort], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            abort.cancel()
            if not read.done():
                read.cancel()
        if aborted.is_set():
            return None
        if not read.done() or read.cancelled():
            raise StreamFailed(f"prefill {self.h.instance_id} reported no KV progress of request "
                               f"{self.req.request_id} for {timeout:g} s")
        return self._progress(read)

    def _progress(self, read: asyncio.Future) -> KVProgress:
        error = read.exception()
        if isinstance(error, grpc.aio.AioRpcError):
            raise StreamFailed(f"KV stream from prefill {self.h.instance_id} ({self.h.control_address}) "
                               f"failed: {error.code().name}: {error.details()}")
        if error is not None:
            raise error
        if read.result() is grpc.aio.EOF:
            raise StreamFailed(f"KV stream from prefill {self.h.instance_id} ended without a result")
        return convert.from_proto(read.result())

    async def _read(self, read: Read) -> None:
        span = slice(read.first_block, read.stop_block)
        local, remote = self.blocks[span], self.h.block_ids[span]
        start = time.perf_counter()
        self.reading = asyncio.ensure_future(self.svc.rt.kv.pull_async(self.h, local, read.layers, remote))
        try:
            nbytes = await asyncio.shield(self.reading)
        except (TransferError, ValueError) as e:
            raise StreamFailed(f"KV read of layers {read.layers.start}..{read.layers.stop - 1} from "
                               f"prefill {self.h.instance_id} ({self.h.transfer_address}) failed: {e}") from e
        self.reading = None
        self.svc.transfers["kv_transfer_bytes_total"] += nbytes
        self.svc.transfers["kv_transfer_seconds_total"] += time.perf_counter() - start

    def _free(self) -> None:
        """Free the local blocks once no read can land in them any more."""
        blocks, reading, self.blocks = self.blocks, self.reading, []
        if not blocks:
            return
        if reading is None:
            self.svc._free_later(blocks)
        elif reading.done():  # a timed-out read's bytes may still arrive: freed once it settled
            self.svc._free_when_settled(reading, blocks)
        else:
            reading.add_done_callback(lambda f: self.svc._free_when_settled(f, blocks))

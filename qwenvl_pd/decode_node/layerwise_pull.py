"""Decode's layer-wise KV path: the blocks are reserved on prefill's announce, each group of
layers is read while prefill computes the later ones (WatchKV), then Release and join with the
first token from prefill's final result. The whole-KV path (DecodeService._pull_and_join) stays
the default; both read through a KVPull (kv_pull.py), which keeps the guarantees on the blocks.
A prefill that reports nothing for the transfer timeout fails the stream UNAVAILABLE.
"""
from __future__ import annotations

import asyncio

import grpc

from qwenvl_pd.decode_node.kv_pull import KVPull
from qwenvl_pd.kv_transfer.cursor import Read, ReadCursor
from qwenvl_pd.kv_transfer.transfer_engine import TransferError
from qwenvl_pd.messages import KVProgress, PrefillResult, TokenEvent
from qwenvl_pd.protos import convert, qwenvl_pd_pb2 as pb, qwenvl_pd_pb2_grpc as pb_grpc


class StreamFailed(Exception):
    """The layer-wise read cannot finish: the stream ends UNAVAILABLE with this message."""


class LayerwisePull:
    def __init__(self, pull: KVPull, transfer_timeout_s: float):
        self.pull, self.req, self.h = pull, pull.req, pull.req.handle
        self.timeout = transfer_timeout_s

    async def follow(self, context) -> PrefillResult | None:
        """Read as prefill computes until its result; None when aborted meanwhile. A failure
        frees the blocks (once no read can land) and ends the stream UNAVAILABLE."""
        try:
            return await self._follow()
        except StreamFailed as e:
            await self.pull.free()
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        except BaseException:  # cancelled (the stream went away) or a bug: never leak the blocks
            await self.pull.free()
            raise

    async def finish(self, result: PrefillResult | None, context) -> TokenEvent | None:
        """Release, then join -> None; or the event that ends the stream at once (aborted, or
        the first token ended the request)."""
        rid, pull = self.req.request_id, self.pull
        if result is None or result.finish_reason:  # aborted, or the first token ended it: no lease
            await pull.free()
            return TokenEvent(finish_reason=result.finish_reason if result else "abort")
        pull.landed()  # its bytes and seconds counted as each group landed
        try:
            unconfirmed = await pull.release(result.handle)
        except asyncio.CancelledError:
            await pull.free()
            raise
        if unconfirmed or pull.aborted.is_set():
            await pull.free()
            if unconfirmed:
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"KV lease of request {rid} on "
                                    f"prefill {self.h.instance_id} {unconfirmed}; not using the read")
            return TokenEvent(finish_reason="abort")
        await pull.join(result.first_token, result.mrope_position_delta)
        return None

    async def _follow(self) -> PrefillResult | None:
        cursor = ReadCursor(self.h.fingerprint.num_layers, self.h.fingerprint.block_size,
                            self.req.prompt_len, len(self.h.block_ids))
        call = pb_grpc.PrefillStub(self.pull.peers.channel(self.h.control_address)).WatchKV(
            pb.WatchKVRequest(request_id=self.req.request_id, instance_id=self.h.instance_id))
        try:
            while (progress := await self._next(call)) is not None:
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

    async def _next(self, call) -> KVProgress | None:
        """The next progress report; None once aborted (Abort between layers)."""
        aborted = self.pull.aborted
        read, abort = asyncio.ensure_future(call.read()), asyncio.ensure_future(aborted.wait())
        try:
            await asyncio.wait([read, abort], timeout=self.timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            abort.cancel()
            if not read.done():
                read.cancel()
        if aborted.is_set():
            return None
        if not read.done() or read.cancelled():
            raise StreamFailed(f"prefill {self.h.instance_id} reported no KV progress of request "
                               f"{self.req.request_id} for {self.timeout:g} s")
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
        try:
            await self.pull.read(read.first_block, read.stop_block, read.layers)
        except (TransferError, ValueError) as e:
            raise StreamFailed(f"KV read of layers {read.layers.start}..{read.layers.stop - 1} from "
                               f"prefill {self.h.instance_id} ({self.h.transfer_address}) failed: {e}") from e

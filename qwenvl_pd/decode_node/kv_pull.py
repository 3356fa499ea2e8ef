"""One request's KV on its way into decode: the blocks reserved for it, the read in flight, and
whether it was aborted meanwhile. The whole-KV path (DecodeService) and the layer-wise path
(layerwise.py) both read through a KVPull, so both keep the same guarantees: a local block is
freed only once no read can still land in it (a timed-out read is waited for), and the bytes
are used only if prefill confirms at Release that it held the blocks for this request throughout.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import torch

from qwenvl_pd.engine.commands import FreeBlocks, JoinPrefilled, ReserveBlocks
from qwenvl_pd.engine.sequence import Sequence
from qwenvl_pd.kv_transfer.transfer_engine import TransferTimeout
from qwenvl_pd.kv_transfer.handle import KVHandle
from qwenvl_pd.messages import DecodeRequest, SampledToken
from qwenvl_pd.node.host import NodeHost
from qwenvl_pd.decode_node.prefill_peers import PrefillPeers


@dataclass
class TransferStats:
    """The counters decode reports in its load (kv_transfer_* of LoadReport)."""
    kv_transfers_total: int = 0
    kv_transfer_bytes_total: int = 0
    kv_transfer_seconds_total: float = 0.0


class KVPull:
    def __init__(self, host: NodeHost, peers: PrefillPeers, stats: TransferStats, req: DecodeRequest):
        self.host, self.peers, self.stats, self.req = host, peers, stats, req
        self.blocks: list[int] = []  # ours until join() hands them to the engine or free()
        self.reading: asyncio.Future | None = None  # the read in flight (or failed), if any
        self.aborted = asyncio.Event()  # set by abort(): the caller went away mid-read

    async def reserve(self) -> None:
        """Blocks for the handle's KV, from the engine thread (OutOfBlocks, QueueFull). A caller
        cancelled meanwhile gives them back once the reservation has happened (it happens
        anyway: the engine thread does not see the cancel)."""
        cfg = self.host.runtime.cfg
        done = self.host.send(ReserveBlocks(len(self.req.handle.block_ids), cfg.max_queued_requests))
        try:
            self.blocks = await asyncio.shield(asyncio.wrap_future(done))
        except asyncio.CancelledError:
            done.add_done_callback(lambda f: f.exception() is None and self._free_now(f.result()))
            raise

    async def read(self, first: int = 0, stop: int | None = None, layers: range | None = None) -> None:
        """Read the handle's blocks [first, stop) (layers: all) into ours; TransferError or
        ValueError when it fails. Counts its bytes and seconds."""
        h, span, start = self.req.handle, slice(first, stop), time.perf_counter()
        remote = None if layers is None else h.block_ids[span]
        # every tensor-parallel rank reads its own heads; rank 0 counts its bytes
        self.reading = asyncio.ensure_future(
            self.host.runtime.kv.pull_async(h, self.blocks[span], layers, remote))
        nbytes = await asyncio.shield(self.reading)
        self.reading = None
        self.stats.kv_transfer_bytes_total += nbytes
        self.stats.kv_transfer_seconds_total += time.perf_counter() - start

    def abort(self) -> None:
        self.aborted.set()

    async def release(self, handle: KVHandle) -> str:
        """Release at prefill: "" when it confirms it held the blocks for us until now, else why not."""
        return await self.peers.release(handle, self.req.request_id)

    def landed(self) -> None:
        """The whole KV is in our blocks: one more transfer counted."""
        self.stats.kv_transfers_total += 1

    async def join(self, first_token: SampledToken, mrope_position_delta: int) -> None:
        """The read is complete and confirmed: the row joins the batch, its blocks the engine's."""
        seq, self.blocks = decode_sequence(self.req, self.blocks, first_token, mrope_position_delta), []
        await self.host.settle(JoinPrefilled(seq))

    async def free(self) -> None:
        """Give the blocks back once no read can land in them any more."""
        blocks, reading, self.blocks = self.blocks, self.reading, []
        if not blocks:
            return
        if reading is None or (reading.done() and not isinstance(_error(reading), TransferTimeout)):
            await self.host.settle(FreeBlocks(blocks))
        else:  # still reading, or timed out: Mooncake may write them until it has settled
            reading.add_done_callback(lambda f: self._free_when_settled(f, blocks))

    def _free_when_settled(self, read: asyncio.Future, blocks: list[int]) -> None:
        error = _error(read)
        if isinstance(error, TransferTimeout):
            error.settled.add_done_callback(lambda _: self._free_now(blocks))
        else:
            self._free_now(blocks)

    def _free_now(self, blocks: list[int]) -> None:
        self.host.send(FreeBlocks(blocks))


def _error(read: asyncio.Future) -> BaseException | None:
    return None if read.cancelled() else read.exception()


def decode_sequence(req: DecodeRequest, blocks: list[int], first_token: SampledToken,
                    mrope_position_delta: int) -> Sequence:
    """The engine's row for a prefilled request: prompt and first token, its KV in blocks."""
    seq = Sequence(req.request_id, list(req.prompt_token_ids), torch.zeros(3, 0, dtype=torch.long),
                   mrope_position_delta, req.sampling)
    seq.token_ids.append(first_token.token_id)
    seq.block_ids = list(blocks)
    return seq

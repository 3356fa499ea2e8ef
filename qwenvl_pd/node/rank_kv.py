"""Every rank's KV region on Mooncake, and decode pulls that run on all ranks at once.

Each tensor-parallel rank registers its own shard of the KV cache with its own transfer engine;
prefill lists every rank's segment in the KVHandle. A decode pull is one job that rank 0
broadcasts on the ranks' host group: each rank reads the heads it owns from the prefill rank(s)
holding them (kv_transfer/heads.py: any TP sizes that split the same heads), one batched read per
prefill rank, then the ranks agree on the outcome with one all-reduce. A timed-out
read is waited for before the rank reports, so when a pull returns no read can still land.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist

from qwenvl_pd.engine.ranks import RankContext, recv_message, send_message
from qwenvl_pd.kv_transfer.transfer_engine import KVTransferEngine, TransferError, TransferTimeout
from qwenvl_pd.kv_transfer.handle import KVHandle, KVSegment
from qwenvl_pd.kv_transfer.heads import head_pieces, heads_per_rank, pull_plan
from qwenvl_pd.kv_transfer.layout import Region

log = logging.getLogger(__name__)
ADDRESS_BYTES = 256  # a "host:port" session id, padded for the all-gather


@dataclass(frozen=True)
class TransferOptions:
    role: str                # "prefill" | "decode"
    host: str
    protocol: str = "tcp"
    device: str = ""
    timeout_s: float = 10.0


@dataclass(frozen=True)
class PullJob:
    """One request's blocks: remote ids in every prefill rank's region -> local ids."""
    segments: tuple[KVSegment, ...]  # every prefill rank's, rank order
    region_num_blocks: int
    block_bytes: int  # of a prefill rank's block
    num_kv_heads: int  # of the model: with len(segments) it says which heads each prefill rank holds
    remote_blocks: tuple[int, ...]
    local_blocks: tuple[int, ...]
    layers: tuple[int, int] = (0, 0)  # [first, stop) of the layers to read; (0, 0): all

    @classmethod
    def of(cls, handle: KVHandle, local_blocks: list[int], layers: range | None = None,
           remote_blocks: tuple[int, ...] | None = None) -> PullJob:
        span = (layers.start, layers.stop) if layers is not None else (0, 0)
        remote = handle.block_ids if remote_blocks is None else tuple(remote_blocks)
        return cls(handle.segments, handle.region_num_blocks, handle.block_bytes,
                   handle.fingerprint.num_kv_heads, remote, tuple(local_blocks), span)


class RankKV:
    """This rank's transfer engine and registered region; on rank 0 also every rank's segment."""

    def __init__(self, opts: TransferOptions, ctx: RankContext):
        self.transfer = KVTransferEngine(opts.host, opts.protocol, opts.device, timeout_s=opts.timeout_s)
        self.transfer.register(ctx.kv_cache)
        self.region = Region.from_tensor(ctx.kv_cache)
        self.tp, self.group, self.role = ctx.tp, ctx.group, opts.role
        own = KVSegment(self.transfer.session_id, self.region.base)
        self.segments = _all_gather(own, ctx) if ctx.group is not None else (own,)
        self._lock = threading.Lock()  # one job at a time on the group

    def pull(self, handle: KVHandle, local_blocks: list[int], layers: range | None = None,
             remote_blocks: tuple[int, ...] | None = None) -> int:
        """Rank 0: read the handle's blocks (or remote_blocks of them, layer-wise: only `layers`)
        into local_blocks on every rank -> bytes read here."""
        job = PullJob.of(handle, local_blocks, layers, remote_blocks)
        if self.group is None:  # one rank: a late read keeps its TransferTimeout for the caller
            return self._read(job, settle=False)
        with self._lock:
            _send(job, self.group)
            return self._agree(job)

    async def pull_async(self, handle: KVHandle, local_blocks: list[int], layers: range | None = None,
                         remote_blocks: tuple[int, ...] | None = None) -> int:
        """pull() for the event loop: one rank awaits its reads there, several hand the job to a
        thread (the broadcast and all-reduce block)."""
        if self.group is not None:
            return await asyncio.get_running_loop().run_in_executor(
                None, self.pull, handle, local_blocks, layers, remote_blocks)
        job = PullJob.of(handle, local_blocks, layers, remote_blocks)
        plan = self._plan(job)
        for rank, slices in plan.items():  # a timeout ends the pull: its `settled` is the last read
            await self.transfer.read_batch_async(job.segments[rank].transfer_address, slices)
        return _plan_bytes(plan)

    def serve_pulls(self) -> None:
        """Ranks 1..N-1: run every job rank 0 sends until it closes the group."""
        while (job := _recv(self.group)) is not None:
            try:
                self._agree(job)
            except TransferError:
                pass  # rank 0 reports it

    def _agree(self, job: PullJob) -> int:
        failed, read, error = torch.zeros(1, dtype=torch.long), 0, None
        try:
            read = self._read(job, settle=True)
        except (TransferError, ValueError) as e:  # a bad job must not skip the all-reduce
            log.error("rank %d: KV read failed: %s", self.tp.rank, e)
            failed[0], error = 1, e
        dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=self.group)
        if failed.item():
            raise TransferError("KV read failed on at least one tensor-parallel rank"
                                + (f": {error}" if error else ""))
        return read

    def _read(self, job: PullJob, settle: bool) -> int:
        """One batched read per prefill rank holding heads of ours, in turn: a timeout ends the
        pull with every earlier read done, so its `settled` covers the whole pull."""
        plan = self._plan(job)
        for rank, slices in plan.items():
            try:
                self.transfer.read_batch(job.segments[rank].transfer_address, slices)
            except TransferTimeout as e:
                if settle:
                    e.settled.result()
                raise
        return _plan_bytes(plan)

    def _plan(self, job: PullJob) -> dict[int, list]:
        pieces = head_pieces(job.num_kv_heads, len(job.segments), self.tp.size, self.tp.rank)
        heads = heads_per_rank(job.num_kv_heads, len(job.segments))  # of each prefill rank
        remotes = [Region(seg.kv_base_ptr, self.region.num_layers, job.region_num_blocks,
                          job.block_bytes, heads) for seg in job.segments]
        layers = range(*job.layers) if job.layers != (0, 0) else None
        return pull_plan(self.region, remotes, pieces, job.remote_blocks, job.local_blocks, layers)

    def close(self) -> None:
        if self.group is not None and self.tp.rank == 0 and self.role == "decode":
            with self._lock:  # ends the other ranks' serve_pulls
                _send(None, self.group)
        self.transfer.close()


def setup_rank_kv(opts: TransferOptions, ctx: RankContext) -> RankKV:
    """The rank_setup hook of the nodes: register this rank's KV; decode ranks 1..N-1 then
    serve pull jobs on a thread of their own."""
    kv = RankKV(opts, ctx)
    if opts.role == "decode" and ctx.tp.rank > 0:
        threading.Thread(target=kv.serve_pulls, name="kv-pulls", daemon=True).start()
    return kv


def _plan_bytes(plan: dict[int, list]) -> int:
    return sum(n for slices in plan.values() for _, _, n in slices)


def _all_gather(own: KVSegment, ctx: RankContext) -> tuple[KVSegment, ...]:
    address = own.transfer_address.encode()
    if len(address) > ADDRESS_BYTES:
        raise ValueError(f"transfer address {own.transfer_address!r} is too long")
    mine = torch.zeros(ADDRESS_BYTES + 8, dtype=torch.uint8)
    mine[:len(address)] = torch.tensor(list(address), dtype=torch.uint8)
    mine[ADDRESS_BYTES:] = torch.tensor([own.kv_base_ptr], dtype=torch.long).view(torch.uint8)
    parts = [torch.empty_like(mine) for _ in range(ctx.tp.size)]
    dist.all_gather(parts, mine, group=ctx.group)
    return tuple(KVSegment(bytes(p[:ADDRESS_BYTES].tolist()).rstrip(b"\0").decode(),
                           int(p[ADDRESS_BYTES:].view(torch.long))) for p in parts)


def _send(job: PullJob | None, group) -> None:
    if job is None:
        send_message(None, torch.empty(0, dtype=torch.uint8), group)
        return
    addresses = "\n".join(seg.transfer_address for seg in job.segments).encode()
    ints = torch.tensor([job.region_num_blocks, job.block_bytes, job.num_kv_heads, len(job.remote_blocks),
                         *job.layers, *(seg.kv_base_ptr for seg in job.segments), *job.remote_blocks, *job.local_blocks])
    send_message(ints, torch.tensor(list(addresses), dtype=torch.uint8), group)


def _recv(group) -> PullJob | None:
    message = recv_message(group)
    if message is None:
        return None
    values, addresses = message[0].tolist(), bytes(message[1].tolist()).decode().split("\n")
    region_blocks, block_bytes, heads, n, first, stop = values[:6]
    ptrs, ids = values[6:6 + len(addresses)], values[6 + len(addresses):]
    return PullJob(tuple(KVSegment(a, p) for a, p in zip(addresses, ptrs)), region_blocks, block_bytes,
                   heads, tuple(ids[:n]), tuple(ids[n:]), (first, stop))

"""Every rank's KV region on Mooncake, and decode pulls that run on all ranks at once.

Each tensor-parallel rank registers its own shard of the KV cache with its own transfer engine;
prefill lists every rank's segment in the KVHandle. A decode pull is one job that rank 0
broadcasts on the ranks' host group: each rank reads the heads it owns from the prefill rank(s)
holding them (kv_transfer/heads.py: any TP sizes that split the same heads), one batched read per
prefill rank, several pulls at once (node/pull_jobs.py). A timed-out read is waited for before
the rank reports, so when a pull returns no read can still land.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.distributed as dist

from qwenvl_pd.engine.ranks import IDLE_TIMEOUT, RankContext
from qwenvl_pd.kv_transfer.transfer_engine import KVTransferEngine, TransferError, TransferTimeout
from qwenvl_pd.kv_transfer.handle import KVHandle, KVSegment
from qwenvl_pd.kv_transfer.heads import head_pieces, heads_per_rank, pull_plan
from qwenvl_pd.kv_transfer.layout import Region
from qwenvl_pd.node.pull_jobs import PULLS_AT_ONCE, JobPoster, PullJob, serve_jobs

log = logging.getLogger(__name__)
ADDRESS_BYTES = 256  # a "host:port" session id, padded for the all-gather


@dataclass(frozen=True)
class TransferOptions:
    role: str                # "prefill" | "decode"
    host: str
    protocol: str = "tcp"
    device: str = ""
    timeout_s: float = 10.0


class RankKV:
    """This rank's transfer engine and registered region; on rank 0 also every rank's segment."""

    def __init__(self, opts: TransferOptions, ctx: RankContext):
        self.transfer = KVTransferEngine(opts.host, opts.protocol, opts.device, timeout_s=opts.timeout_s)
        self.transfer.register(ctx.kv_cache)
        self.region = Region.from_tensor(ctx.kv_cache)
        self.tp, self.group, self.role = ctx.tp, ctx.group, opts.role
        own = KVSegment(self.transfer.session_id, self.region.base)
        self.segments = _all_gather(own, ctx) if ctx.group is not None else (own,)
        # every rank creates it, in the same order: new_group is collective
        self.answers_group = (dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
                              if ctx.group is not None else None)
        self.jobs = (JobPoster(ctx.group, self.answers_group, self.tp.size)
                     if ctx.group is not None and self.tp.rank == 0 and self.role == "decode" else None)
        self._pulls = ThreadPoolExecutor(PULLS_AT_ONCE, thread_name_prefix="kv-pull")

    def pull(self, handle: KVHandle, local_blocks: list[int], layers: range | None = None,
             remote_blocks: tuple[int, ...] | None = None) -> int:
        """Rank 0: read the handle's blocks (or remote_blocks of them, layer-wise: only `layers`)
        into local_blocks on every rank -> bytes read here."""
        job = PullJob.of(handle, local_blocks, layers, remote_blocks)
        if self.group is None:  # one rank: a late read keeps its TransferTimeout for the caller
            return self._read(job, settle=False)
        answers, error, read = self.jobs.post(job), None, 0
        try:
            read = self._read(job, settle=True)
        except (TransferError, ValueError) as e:
            log.error("rank 0: KV read failed: %s", e)
            error = e
        if answers.wait() or error:  # past the wait, no rank's read can still land
            raise TransferError("KV read failed on at least one tensor-parallel rank"
                                + (f": {error}" if error else ""))
        return read

    async def pull_async(self, handle: KVHandle, local_blocks: list[int], layers: range | None = None,
                         remote_blocks: tuple[int, ...] | None = None) -> int:
        """pull() for the event loop: one rank awaits its reads there, several hand the job to a
        thread (the broadcast and all-reduce block)."""
        if self.group is not None:
            return await asyncio.get_running_loop().run_in_executor(
                self._pulls, self.pull, handle, local_blocks, layers, remote_blocks)
        job = PullJob.of(handle, local_blocks, layers, remote_blocks)
        plan = self._plan(job)
        for rank, slices in plan.items():  # a timeout ends the pull: its `settled` is the last read
            await self.transfer.read_batch_async(job.segments[rank].transfer_address, slices)
        return _plan_bytes(plan)

    def serve_pulls(self) -> None:
        """Ranks 1..N-1: run the jobs rank 0 posts until it closes the group."""
        serve_jobs(self.group, self.answers_group, lambda job: self._read(job, settle=True))

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
        if self.jobs is not None:
            self.jobs.close()  # ends the other ranks' serve_pulls
        self._pulls.shutdown(wait=False, cancel_futures=True)
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

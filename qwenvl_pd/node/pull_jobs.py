"""Decode pulls across tensor-parallel ranks, none waiting for another: rank 0 posts each job
with an id on the ranks' host group, every rank reads its heads on a worker thread, and ranks
1..N-1 answer (job id, failed) on a group of their own. A read that waits out a hung prefill
holds up no other pull (one all-reduce per job, in posting order, did)."""
from __future__ import annotations

import itertools
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from qwenvl_pd.engine.ranks import recv_message, send_message
from qwenvl_pd.kv_transfer.handle import KVHandle, KVSegment

log = logging.getLogger(__name__)
PULLS_AT_ONCE = 32  # per rank; each mostly waits on a read, which Mooncake bounds per peer
GOODBYE = -1  # the job id of a rank's last answer


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


class Answers:
    """Rank 0's wait for the other ranks' outcome of one job."""

    def __init__(self, expected: int):
        self.remaining, self.failed, self.done = expected, False, threading.Event()

    def wait(self) -> bool:
        """Block until every other rank has finished its reads -> whether one failed."""
        self.done.wait()
        return self.failed


class JobPoster:
    """Rank 0: posts jobs, collects the answers of ranks 1..N-1 (one thread each)."""

    def __init__(self, group, answers_group, size: int):
        self.group, self.answers_group, self.size = group, answers_group, size
        self._ids = itertools.count()
        self._waiting: dict[int, Answers] = {}
        self._lock, self._send_lock = threading.Lock(), threading.Lock()
        self.broken = False  # a rank stopped answering: every pull fails from then on
        self._threads = [threading.Thread(target=self._collect, args=(rank,), name=f"kv-answers-{rank}",
                                          daemon=True) for rank in range(1, size)]
        for thread in self._threads:
            thread.start()

    def post(self, job: PullJob) -> Answers:
        job_id, answers = next(self._ids), Answers(self.size - 1)
        with self._lock:
            if self.broken:
                answers.failed = True
                answers.done.set()
                return answers
            self._waiting[job_id] = answers
        with self._send_lock:  # the broadcasts of one message must not interleave with another's
            _send(job_id, job, self.group)
        return answers

    def close(self) -> None:
        """Ends the other ranks' serve_jobs; their goodbye ends the collectors."""
        with self._send_lock:
            send_message(None, torch.empty(0, dtype=torch.uint8), self.group)
        for thread in self._threads:
            thread.join(timeout=30)

    def _collect(self, rank: int) -> None:
        answer = torch.zeros(2, dtype=torch.long)
        try:
            while True:
                dist.recv(answer, src=rank, group=self.answers_group)
                job_id, failed = answer.tolist()
                if job_id == GOODBYE:
                    return
                self._answered(job_id, bool(failed))
        except RuntimeError as e:  # the rank is gone: no job of ours may wait for it
            log.error("rank %d stopped answering KV pulls: %s", rank, e)
            self._fail_all()

    def _fail_all(self) -> None:
        with self._lock:
            self.broken = True
            waiting, self._waiting = self._waiting, {}
        for answers in waiting.values():
            answers.failed = True
            answers.done.set()

    def _answered(self, job_id: int, failed: bool) -> None:
        with self._lock:
            answers = self._waiting[job_id]
            answers.remaining -= 1
            answers.failed |= failed
            if answers.remaining == 0:
                del self._waiting[job_id]
                answers.done.set()


def serve_jobs(group, answers_group, read: Callable[[PullJob], object]) -> None:
    """Ranks 1..N-1: run every job rank 0 posts (several at once) until it says stop; read
    raises on a failed read, after waiting for the read to settle."""
    send_lock = threading.Lock()

    def run(job_id: int, job: PullJob) -> None:
        failed = 0
        try:
            read(job)
        except Exception as e:  # noqa: BLE001 - any failure is this job's, and rank 0 must hear of it
            log.error("KV read of pull %d failed: %s", job_id, e)
            failed = 1
        with send_lock:
            dist.send(torch.tensor([job_id, failed]), dst=0, group=answers_group)

    with ThreadPoolExecutor(PULLS_AT_ONCE, thread_name_prefix="kv-pull") as pool:
        while (message := _recv(group)) is not None:
            pool.submit(run, *message)
    dist.send(torch.tensor([GOODBYE, 0]), dst=0, group=answers_group)


def _send(job_id: int, job: PullJob, group) -> None:
    addresses = "\n".join(seg.transfer_address for seg in job.segments).encode()
    ints = torch.tensor([job_id, job.region_num_blocks, job.block_bytes, job.num_kv_heads, len(job.remote_blocks),
                         *job.layers, *(seg.kv_base_ptr for seg in job.segments), *job.remote_blocks,
                         *job.local_blocks])
    send_message(ints, torch.tensor(list(addresses), dtype=torch.uint8), group)


def _recv(group) -> tuple[int, PullJob] | None:
    message = recv_message(group)
    if message is None:
        return None
    values, addresses = message[0].tolist(), bytes(message[1].tolist()).decode().split("\n")
    job_id, region_blocks, block_bytes, heads, n, first, stop = values[:7]
    ptrs, ids = values[7:7 + len(addresses)], values[7 + len(addresses):]
    return job_id, PullJob(tuple(KVSegment(a, p) for a, p in zip(addresses, ptrs)), region_blocks,
                           block_bytes, heads, tuple(ids[:n]), tuple(ids[n:]), (first, stop))

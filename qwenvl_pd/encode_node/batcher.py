"""Concurrent Encode calls -> batches for one worker thread.

Each missing item becomes one job (callers asking for a key already queued wait on that job
instead; one asking while it runs gets a job of its own, which the pool then serves); the worker
takes every job waiting, up to a token budget, and hands them to `run` at once, so images of
different requests share one tower forward.
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

from qwenvl_pd.messages import MediaItem

log = logging.getLogger(__name__)


@dataclass
class Job:
    key: str
    item: MediaItem
    num_tokens: int
    # one per caller: its lease length and the future its result goes to
    waiters: list[tuple[float, Future]] = field(default_factory=list)


class EncodeBatcher:
    def __init__(self, run: Callable[[list[Job]], None], max_tokens: int):
        self.run, self.max_tokens = run, max_tokens
        self._queue: deque[Job] = deque()
        self._jobs: dict[str, Job] = {}  # queued, by key: a running job's waiters are final
        self._cond = threading.Condition()
        self._stopped = False
        self.running = 0  # jobs in the batch being run now
        self._thread = threading.Thread(target=self._loop, name="encode-worker", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def submit(self, key: str, item: MediaItem, num_tokens: int, lease_s: float) -> tuple[Future, bool]:
        """-> (the future of this caller's result, whether it joined a job already there)."""
        fut: Future = Future()
        with self._cond:
            if self._stopped:
                raise RuntimeError("the encode worker has stopped")
            job = self._jobs.get(key)
            joined = job is not None
            if job is None:
                job = self._jobs[key] = Job(key, item, num_tokens)
                self._queue.append(job)
                self._cond.notify()
            job.waiters.append((lease_s, fut))
        return fut, joined

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            try:
                self.run(batch)
            except BaseException as e:  # noqa: BLE001 - the worker must outlive one bad batch
                log.exception("encode batch of %d failed", len(batch))
                _fail(batch, e)
            finally:
                self._finish(batch)

    def _take(self) -> list[Job] | None:
        """Every waiting job that fits the token budget (at least one); None once stopped."""
        with self._cond:
            while not self._queue and not self._stopped:
                self._cond.wait()
            if self._stopped:
                _fail(list(self._queue), RuntimeError("the encode worker stopped"))
                return None
            batch, tokens = [], 0
            while self._queue and (not batch or tokens + self._queue[0].num_tokens <= self.max_tokens):
                job = self._queue.popleft()
                del self._jobs[job.key]
                tokens += job.num_tokens
                batch.append(job)
            self.running = len(batch)
            return batch

    def _finish(self, batch: list[Job]) -> None:
        with self._cond:
            self.running = 0


def _fail(jobs: list[Job], error: BaseException) -> None:
    for job in jobs:
        for _, fut in job.waiters:
            if not fut.done():
                fut.set_exception(error)

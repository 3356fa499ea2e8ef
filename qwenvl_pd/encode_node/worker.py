"""What the encode worker does with one batch of jobs: serve each from the pool or the store
when it is there by now, else preprocess it and run one tower forward over all the rest, write
each item's embeddings into its pool entry (and the store), and lease it to every waiter."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import nn

from qwenvl_pd.encode_node.batcher import Job
from qwenvl_pd.encode_node.media import Pixels, to_pixels
from qwenvl_pd.encode_node.pool import EmbeddingPool, Entry, Lease, PoolError
from qwenvl_pd.kv_transfer.embedding_store import EmbeddingStore
from qwenvl_pd.model.vision import VisionEmbeds, encode
from qwenvl_pd.model.vision_config import VisionPreprocessConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Served:
    entry: Entry
    lease: Lease
    source: str  # "pool" | "store" | "encoded"


@dataclass(frozen=True)
class EntryLayout:
    """An entry: embeds [n, hidden] then deepstack [num_deepstack, n, hidden], all of dtype."""
    hidden_size: int
    num_deepstack: int
    dtype: torch.dtype

    def nbytes(self, num_tokens: int) -> int:
        return num_tokens * (1 + self.num_deepstack) * self.hidden_size * self.dtype.itemsize


class EncodeWork:
    def __init__(self, tower: nn.Module, pool: EmbeddingPool, arena: torch.Tensor, layout: EntryLayout,
                 vision_cfg: VisionPreprocessConfig, family: str, store: EmbeddingStore | None = None):
        self.tower, self.pool, self.arena, self.layout = tower, pool, arena, layout
        self.vision_cfg, self.family, self.store = vision_cfg, family, store
        self.hits = self.store_hits = self.misses = 0
        self.encode_seconds = 0.0

    def __call__(self, jobs: list[Job]) -> None:
        todo = [j for j in jobs if not self._from_pool(j) and not self._from_store(j)]
        ready = [(j, px) for j in todo if (px := self._pixels(j)) is not None]
        if ready:
            self._encode(ready)

    def _from_pool(self, job: Job) -> bool:
        """Encoded by an earlier batch while this job waited."""
        served = [self.pool.lease_if_ready(job.key, s) for s, _ in job.waiters]
        if served[0] is None:
            return False
        self.hits += len(job.waiters)
        for (_, fut), (entry, lease) in zip(job.waiters, served):
            fut.set_result(Served(entry, lease, "pool"))
        return True

    def _from_store(self, job: Job) -> bool:
        if self.store is None:
            return False
        nbytes = self.layout.nbytes(job.num_tokens)
        data = self.store.get(job.key)
        if data is None or len(data) != nbytes:
            return False
        entry = self._reserve(job, nbytes)
        if entry is not None:
            self._write(entry, torch.frombuffer(bytearray(data), dtype=torch.uint8))
            self._publish(job, entry, "store", in_store=True)
            self.store_hits += len(job.waiters)
        return True

    def _pixels(self, job: Job) -> Pixels | None:
        try:
            return to_pixels(job.item, self.vision_cfg, self.family)
        except ValueError as e:
            _fail(job, e)
            return None

    def _encode(self, ready: list[tuple[Job, Pixels]]) -> None:
        start = time.perf_counter()
        pixels = torch.cat([px.values for _, px in ready]).to(self.arena.device)
        grid = torch.tensor([px.grid_thw for _, px in ready])
        with torch.inference_mode():
            parts = encode(self.tower, pixels, grid).split([job.num_tokens for job, _ in ready])
        self.encode_seconds += time.perf_counter() - start
        self.misses += len(ready)
        for (job, _), embeds in zip(ready, parts):
            entry = self._reserve(job, self.layout.nbytes(job.num_tokens))
            if entry is not None:
                self._write(entry, _flat(embeds))
                self._publish(job, entry, "encoded", in_store=self._put(entry))

    def _reserve(self, job: Job, nbytes: int) -> Entry | None:
        try:
            return self.pool.reserve(job.key, nbytes, job.num_tokens, self.layout.num_deepstack)
        except PoolError as e:
            _fail(job, e)
            return None

    def _write(self, entry: Entry, data: torch.Tensor) -> None:
        """data: uint8 [entry.nbytes], the entry's bytes in handle order."""
        self.arena[entry.offset:entry.offset + entry.nbytes].copy_(data)
        if self.arena.device.type != "cpu":  # a reader must never see bytes still on their way
            getattr(torch, self.arena.device.type).synchronize()

    def _put(self, entry: Entry) -> bool:
        if self.store is None:
            return False
        data = self.arena[entry.offset:entry.offset + entry.nbytes].cpu().numpy().tobytes()
        return self.store.put(entry.key, data)

    def _publish(self, job: Job, entry: Entry, source: str, in_store: bool) -> None:
        leases = self.pool.publish(job.key, [s for s, _ in job.waiters], in_store)
        for (_, fut), lease in zip(job.waiters, leases):
            fut.set_result(Served(entry, lease, source))


def _flat(e: VisionEmbeds) -> torch.Tensor:
    """embeds then deepstack, as one uint8 row of bytes."""
    parts = [e.embeds] + ([] if e.deepstack is None else [e.deepstack])
    return torch.cat([p.contiguous().reshape(-1).view(torch.uint8) for p in parts])


def _fail(job: Job, error: Exception) -> None:
    for _, fut in job.waiters:
        fut.set_exception(error)

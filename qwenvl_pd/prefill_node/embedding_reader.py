"""Prefill's side of EPD: the vision embeddings an encoder made for a request's items, before
the sequence goes to the engine (never on the engine thread).

First, with --allowed-encoders, a handle naming an address outside those hosts fails the request
with EmbeddingRefused (PERMISSION_DENIED) before anything is read or released. Then per embedded
item, in order: refuse a handle not signed with the cluster secret (when one is
set), made by vision weights other than ours, expired, or not the shape the grid needs; take it
from the local encoder cache by key; else one Mooncake read into a slot of a scratch buffer
registered once (all items of one encoder in one batched read), or the Mooncake Store when the
handle says the entry is there and the direct read failed. Every lease is then released on its
encoder, best effort. Anything missing fails the whole request with EmbeddingUnavailable: the
proxy resends it with the media bytes and this prefill encodes them itself.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from qwenvl_pd.kv_transfer.embedding_handle import EmbeddingHandle
from qwenvl_pd.kv_transfer.transfer_engine import TransferError, TransferTimeout
from qwenvl_pd.messages import MediaItem
from qwenvl_pd.model.vision import VisionEmbeds
from qwenvl_pd.prefill_node.encoder_allowlist import encoder_allowlist, handle_addresses
from qwenvl_pd.prefill_node.encoder_release import EncoderReleases
from qwenvl_pd.prefill_node.scratch import Scratch, ScratchFull
from qwenvl_pd.protos import auth

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
UNAVAILABLE = "embeddings unavailable: "  # the gRPC details prefix the proxy falls back on


class EmbeddingUnavailable(Exception):
    """An embedded item cannot be had; str(e) says which and why."""


class EmbeddingRefused(Exception):
    """A handle names an address this prefill may not contact (--allowed-encoders)."""


@dataclass(frozen=True)
class ReaderConfig:
    fingerprint: str      # of this prefill's own vision tower (model/vision_fingerprint.py)
    hidden_size: int      # the tower's output width
    merge_size: int       # spatial merge: a (t, h, w) grid fills t*h*w / merge**2 tokens
    timeout_s: float      # bounds one request's reads (the node's transfer timeout)
    buffer_bytes: int     # the scratch buffer reads land in
    cluster_secret: bytes = b""
    allowed_encoders: tuple[str, ...] = ()  # hosts a handle's addresses must resolve to; (): any


@dataclass
class ReadCounters:
    reads: int = 0        # items read from an encoder or the store
    read_bytes: int = 0
    failures: int = 0     # requests refused with EmbeddingUnavailable or EmbeddingRefused


class EmbeddingReader:
    def __init__(self, cfg: ReaderConfig, transfer, cached: Callable[[str], VisionEmbeds | None],
                 store_get: Callable[[str], bytes | None] | None = None):
        """cached: the local encoder cache's lookup by key; store_get: a Mooncake Store get."""
        self.cfg, self.transfer, self.cached, self.store_get = cfg, transfer, cached, store_get
        self.counters = ReadCounters()
        self.releases = EncoderReleases(cfg.cluster_secret)
        self._scratch: Scratch | None = None  # registered on the first read
        self.allowed = encoder_allowlist(cfg.allowed_encoders)
        if not (self.allowed or cfg.cluster_secret):
            log.warning("no cluster secret and no --allowed-encoders: this prefill reads embeddings from "
                        "any encoder address a caller names")

    async def read(self, media: Sequence[MediaItem]) -> list[VisionEmbeds | None]:
        """Item i's embeddings at [i] (None: it came as bytes); raises EmbeddingUnavailable or
        EmbeddingRefused. A caller cancelled meanwhile leaves the reads to finish (and free their
        slots) alone."""
        handles = [(i, m.embedding) for i, m in enumerate(media) if m.embedding is not None]
        if not handles:
            return [None] * len(media)
        await self._refuse_outsiders(handles)
        grids = {i: media[i].grid_thw for i, _ in handles}
        task = asyncio.ensure_future(self._read_all(handles, grids))
        task.add_done_callback(_retrieved)  # its caller may be gone: no "never retrieved" noise
        got = await asyncio.shield(task)
        return [got.get(i) for i in range(len(media))]

    async def _refuse_outsiders(self, handles: list[tuple[int, EmbeddingHandle]]) -> None:
        """--allowed-encoders: nothing is read from, or released at, an address outside it."""
        for i, h in handles if self.allowed else ():
            if why := await self.allowed.refusal(f"item {i}'s embedding handle", handle_addresses(h)):
                self.counters.failures += 1
                log.warning("refused: %s", why)
                raise EmbeddingRefused(why)

    async def _read_all(self, handles: list[tuple[int, EmbeddingHandle]],
                        grids: dict[int, tuple[int, int, int]]) -> dict[int, VisionEmbeds]:
        deadline = time.monotonic() + self.cfg.timeout_s
        try:
            out, todo = {}, []
            for i, h in handles:
                self._check(i, h, grids[i])
                hit = self.cached(h.key)
                if hit is None:
                    todo.append((i, h))
                else:
                    out[i] = hit
            return out | await self._fetch(todo, deadline) if todo else out
        except EmbeddingUnavailable as e:
            self.counters.failures += 1
            log.info("%s%s", UNAVAILABLE, e)
            raise
        finally:
            self.releases.release([h for _, h in handles])

    def _check(self, i: int, h: EmbeddingHandle, grid: tuple[int, int, int]) -> None:
        secret = self.cfg.cluster_secret
        if secret and not auth.is_signed(h, secret):
            raise EmbeddingUnavailable(f"item {i}: the handle is not signed with the cluster secret")
        if h.vision_fingerprint != self.cfg.fingerprint:
            theirs, ours = h.vision_fingerprint[:12], self.cfg.fingerprint[:12]
            raise EmbeddingUnavailable(f"item {i}: made by other vision weights (fingerprint {theirs}, "
                                       f"this prefill's {ours})")
        if _expired(h):
            raise EmbeddingUnavailable(f"item {i}: its lease on {h.instance_id} has expired")
        t, gh, gw = grid
        tokens = t * gh * gw // self.cfg.merge_size ** 2
        if h.dtype not in DTYPES or h.hidden_size != self.cfg.hidden_size or \
                h.element_size != DTYPES[h.dtype].itemsize or h.num_tokens != tokens:
            raise EmbeddingUnavailable(f"item {i}: {h.dtype} [{h.num_tokens}, {h.hidden_size}] in "
                                       f"{h.nbytes} B is not what grid {tuple(grid)} makes with this model")

    async def _fetch(self, todo: list[tuple[int, EmbeddingHandle]],
                     deadline: float) -> dict[int, VisionEmbeds]:
        scratch = self._scratch_buffer()
        slots: dict[int, int] = {}
        try:
            for i, h in todo:
                slots[i] = await scratch.take(h.nbytes, deadline)
            failed = await self._read_direct(todo, slots)
            out = {i: _embeds(scratch.view(slots[i], h.nbytes), h) for i, h in todo if i not in failed}
            for i, h in todo:
                out[i] = out.get(i) or await self._from_store(i, h, failed.get(i), deadline)
                self._count(h)
            return out
        except ScratchFull as e:
            raise EmbeddingUnavailable(str(e)) from None
        finally:
            for i, h in todo:
                if i in slots:  # a timed-out read's slots are freed when it settles
                    scratch.give(slots.pop(i), h.nbytes)

    async def _read_direct(self, todo, slots: dict[int, int]) -> dict[int, str]:
        """One batched read per encoder -> why each failed item failed."""
        peers = defaultdict(list)
        for i, h in todo:
            peers[h.transfer_address].append((i, h))
        errors = await asyncio.gather(*(self._read_peer(p, items, slots) for p, items in peers.items()))
        return {i: e for items, e in zip(peers.values(), errors) if e for i, _ in items}

    async def _read_peer(self, peer: str, items, slots: dict[int, int]) -> str:
        scratch = self._scratch
        try:
            await self.transfer.read_batch_async(
                peer, [(scratch.base + slots[i], h.address, h.nbytes) for i, h in items])
        except TransferTimeout as e:  # Mooncake may still write these slots until it settles
            held = [(slots.pop(i), h.nbytes) for i, h in items]
            e.settled.add_done_callback(lambda _: [scratch.give(o, n) for o, n in held])
            return f"reading from {peer} timed out"
        except (TransferError, ValueError) as e:
            return f"reading from {peer} failed ({e})"
        late = [i for i, h in items if _expired(h)]  # the encoder may have reused the entry
        return f"item {late[0]}'s lease expired during the read" if late else ""

    async def _from_store(self, i: int, h: EmbeddingHandle, why: str, deadline: float) -> VisionEmbeds:
        if not (h.in_store and self.store_get):
            raise EmbeddingUnavailable(f"item {i}: {why}")
        left = max(deadline - time.monotonic(), 0.001)
        try:
            data = await asyncio.wait_for(asyncio.to_thread(self.store_get, h.key), left)
        except (asyncio.TimeoutError, RuntimeError, OSError) as e:
            raise EmbeddingUnavailable(f"item {i}: {why}; the store get failed ({e!r})") from None
        if data is None or len(data) != h.nbytes:
            raise EmbeddingUnavailable(f"item {i}: {why}; the store holds no {h.nbytes} B entry")
        return _embeds(torch.frombuffer(bytearray(data), dtype=torch.uint8), h)

    def _count(self, h: EmbeddingHandle) -> None:
        self.counters.reads += 1
        self.counters.read_bytes += h.nbytes

    def _scratch_buffer(self) -> Scratch:
        if self._scratch is None:
            self._scratch = Scratch(self.transfer, self.cfg.buffer_bytes)
        return self._scratch


def _retrieved(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()


def _expired(h: EmbeddingHandle) -> bool:
    return bool(h.lease_expires_unix_ms) and time.time() * 1000 >= h.lease_expires_unix_ms


def _embeds(raw: torch.Tensor, h: EmbeddingHandle) -> VisionEmbeds:
    """raw [nbytes] uint8 -> a copy as embeds [n, d] and deepstack [k, n, d] of the handle's dtype."""
    n, d, k = h.num_tokens, h.hidden_size, h.num_deepstack
    values = raw.view(DTYPES[h.dtype])
    embeds = values[:n * d].view(n, d).clone()
    return VisionEmbeds(embeds, values[n * d:].view(k, n, d).clone() if k else None)

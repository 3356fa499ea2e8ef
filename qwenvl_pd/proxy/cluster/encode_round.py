"""The proxy's encode round (EPD): before a prefill gets a request with media, an encode instance
turns the media into embeddings and hands back one signed handle per item; prefill then reads
the embeddings instead of running the vision tower.

Decisions, in order (docs/ARCHITECTURE.md draws the path):
- text-only requests, and clusters without a healthy encoder, send the bytes as before;
- skip: an item sent to the chosen prefill lately as bytes is in its own encoder and prefix
  caches under the pixels' hash: it goes as bytes again, and when every item does, no round.
  An item it got as a handle is cached there under the embedding key instead, so it gets a
  fresh handle (a pool hit on the encoder, a local hit on prefill, no read): switching forms
  would miss both caches;
- the encoder: rendezvous hash of the first item's content hash (Router.pick_encode);
- a failed Encode (down, late, full, a bad reply) is logged and counted; the next healthy encoder
  in rendezvous order gets one more try within what is left of the round's budget
  (--encode-timeout bounds both tries together); when that fails too, or there is no other
  encoder, the round falls back to the bytes: prefill encodes locally, the client never sees it.
Prefill answering FAILED_PRECONDITION "embeddings unavailable: ..." (or INVALID_ARGUMENT: a
prefill older than EPD) is the backend's to handle (the same prefill again with the bytes);
`unread` releases the leases it did not read.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import OrderedDict
from collections.abc import Collection, Sequence

import grpc

from qwenvl_pd.messages import ENCODE, EmbeddingHandle, EmbeddingRelease, EncodeRequest, PrefillRequest
from qwenvl_pd.proxy.cluster import pd_client
from qwenvl_pd.proxy.cluster.instance import Instance
from qwenvl_pd.proxy.cluster.racing import unless_lost
from qwenvl_pd.proxy.cluster.router import Router

log = logging.getLogger(__name__)
EMBEDDINGS_UNAVAILABLE = "embeddings unavailable: "  # prefill's FAILED_PRECONDITION details prefix
ENCODER_DOWN = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
BYTES_MAY_PASS = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED)
MAX_RETRIES = 1   # tries on other encoders after the first fails
RETRY_MIN_S = 1.0  # of the round's budget (--encode-timeout), left for a retry to be worth it


def embeddings_unavailable(e: grpc.aio.AioRpcError) -> bool:
    return e.code() == grpc.StatusCode.FAILED_PRECONDITION and (e.details() or "").startswith(EMBEDDINGS_UNAVAILABLE)


def resend_bytes(e: grpc.aio.AioRpcError) -> bool:
    """A prefill's refusal of a request with handles that the bytes may pass: it could not read
    them, it may not read from that encoder (PERMISSION_DENIED: --allowed-encoders), or it refused
    the item itself (a prefill older than EPD sees an empty image). Input that is really bad is
    refused again with the bytes, and reaches the client then."""
    return embeddings_unavailable(e) or e.code() in BYTES_MAY_PASS


def with_embeddings(req: PrefillRequest, handles: Sequence[EmbeddingHandle],
                    which: Sequence[int] | None = None) -> PrefillRequest:
    """req with the bytes of items `which` (default all) replaced by their handles, in order
    (grid, hash and timing kept)."""
    which = range(len(req.media)) if which is None else which
    if len(handles) != len(which):
        raise ValueError(f"the encoder answered {len(handles)} handles for {len(which)} media items")
    media = list(req.media)
    for i, h in zip(which, handles):
        media[i] = dataclasses.replace(media[i], embedding=h, data=b"", frames=())
    return dataclasses.replace(req, media=tuple(media))


class RecentMedia:
    """The content hashes recently sent to each prefill and the form each went in (bytes or a
    handle); each instance keeps its `per_instance` most recent, least recently sent out first
    (prefill's own encoder cache is bounded too)."""

    def __init__(self, per_instance: int = 1024):
        self.per_instance = per_instance
        self._sent: dict[str, OrderedDict[str, bool]] = {}  # address -> {hash: sent as bytes}

    def as_bytes(self, address: str, content_hash: str) -> bool:
        """The item went to `address` as bytes last time."""
        return self._sent.get(address, {}).get(content_hash) is True

    def add(self, address: str, items: Sequence[tuple[str, bool]]) -> None:
        """items: (content hash, sent as bytes)."""
        seen = self._sent.setdefault(address, OrderedDict())
        for h, as_bytes in items:
            seen[h] = as_bytes
            seen.move_to_end(h)
        while len(seen) > self.per_instance:
            seen.popitem(last=False)

    def keep(self, addresses: Collection[str]) -> None:
        """Forget prefills no longer in the cluster (pods come and go under new addresses)."""
        for gone in set(self._sent) - set(addresses):
            del self._sent[gone]


class EncodeRound:
    def __init__(self, router: Router, timeout_s: float = 30.0, remember: int = 1024):
        self.router, self.timeout_s = router, timeout_s
        self.metrics = router.metrics
        self.recent = RecentMedia(remember)

    async def prepare(self, req: PrefillRequest, prefill: Instance) -> PrefillRequest:
        """What to send `prefill`: req with embedding handles, or req itself (bytes)."""
        encoder = self.router.pick_encode(req.media[0].content_hash) if req.media else None
        if encoder is None:
            return req
        todo = [i for i, m in enumerate(req.media) if not self.recent.as_bytes(prefill.address, m.content_hash)]
        if not todo:
            self.metrics.encode_skips.inc()
            return req
        return await self._encode(req, encoder, todo)

    async def _encode(self, req: PrefillRequest, encoder: Instance, todo: list[int]) -> PrefillRequest:
        """Handles for items `todo` (the others stay bytes: prefill has them in that form); a
        failed try gets one more on the next encoder while the round's budget lasts, then bytes."""
        start, tried = time.monotonic(), []
        while True:
            got = await self._try(req, encoder, todo, start + self.timeout_s - time.monotonic())
            if not isinstance(got, str):
                self.metrics.encode_rounds.inc()
                self.metrics.encode_round_seconds.observe(time.monotonic() - start)
                return got
            tried.append(encoder)
            encoder = self._retry_on(req, tried, start)
            if encoder is None:
                log.warning("encode round of %s failed; prefill encodes the media itself", req.request_id)
                self.metrics.encode_fallbacks.inc(reason=got)
                return req
            self.metrics.encode_retries.inc(reason=got)

    def _retry_on(self, req: PrefillRequest, tried: list[Instance], start: float) -> Instance | None:
        """The encoder for one more try: the next healthy one in rendezvous order, once, and only
        while RETRY_MIN_S of the round's budget is left (a shorter try would most likely be late too)."""
        if len(tried) > MAX_RETRIES or time.monotonic() - start > self.timeout_s - RETRY_MIN_S:
            return None
        return self.router.pick_encode(req.media[0].content_hash, exclude=tried)

    async def _try(self, req: PrefillRequest, encoder: Instance, todo: list[int],
                   timeout_s: float) -> PrefillRequest | str:
        """req with `encoder`'s handles for items `todo`, or why not (a down or late encoder is
        out of rotation until a health check passes)."""
        try:
            with self.router.using(encoder):
                ereq = EncodeRequest(req.request_id, tuple(req.media[i] for i in todo))
                result = await unless_lost(encoder, pd_client.encode(encoder, ereq, timeout_s))
            return with_embeddings(req, result.handles, todo)
        except grpc.aio.AioRpcError as e:
            why, details = e.code().name, e.details()
            if e.code() in ENCODER_DOWN:
                self.router.mark_failed(encoder)
        except ValueError as e:
            why, details = "BAD_REPLY", str(e)
        log.warning("Encode of %s on %s failed (%s: %s)", req.request_id, encoder.address, why, details)
        return why

    def sent(self, prefill: Instance, sent: PrefillRequest) -> None:
        """prefill took `sent` (bytes or handles): its caches hold the media in that form now."""
        self.recent.add(prefill.address, [(m.content_hash, m.embedding is None) for m in sent.media])
        self.recent.keep(self.router.instances["prefill"])

    def unread(self, sent: PrefillRequest, e: grpc.aio.AioRpcError | None = None) -> None:
        """The prefill that got `sent` failed (with e, when known): unpin its leases now; a read
        failure is counted as a fallback."""
        if e is not None and resend_bytes(e):
            log.warning("prefill did not take the embeddings of %s (%s: %s); sending the media bytes",
                        sent.request_id, e.code().name, e.details())
            why = "EMBEDDINGS_UNAVAILABLE" if embeddings_unavailable(e) else e.code().name
            self.metrics.encode_fallbacks.inc(reason=why)
        by_encoder: dict[tuple[str, str], list[str]] = {}
        for m in sent.media:
            if m.embedding is not None and m.embedding.lease_id:
                by_encoder.setdefault((m.embedding.control_address, m.embedding.instance_id), []).append(
                    m.embedding.lease_id)
        for (address, instance_id), leases in by_encoder.items():
            encoder = self.router.instances[ENCODE].get(address)
            if encoder is not None:  # otherwise the lease expires on its own
                asyncio.ensure_future(_release_quietly(encoder, EmbeddingRelease(tuple(leases), instance_id)))


async def _release_quietly(encoder: Instance, release: EmbeddingRelease) -> None:
    try:
        await pd_client.release(encoder, release)
    except grpc.aio.AioRpcError:
        pass  # the lease expires anyway

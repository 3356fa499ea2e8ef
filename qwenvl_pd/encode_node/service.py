"""The encode node's gRPC service: Encode (one signed embedding handle per item, pool hits
served at once, misses batched through the worker), Release, GetLoad."""
from __future__ import annotations

import asyncio
import logging

import grpc

from qwenvl_pd.encode_node.media import MediaError, check_request, num_tokens
from qwenvl_pd.encode_node.pool import PoolError
from qwenvl_pd.encode_node.runtime import EncodeRuntime
from qwenvl_pd.encode_node.worker import Served
from qwenvl_pd.kv_transfer.embedding_handle import EmbeddingHandle
from qwenvl_pd.kv_transfer.embedding_key import embedding_key
from qwenvl_pd.messages import EmbeddingRelease, EncodeRequest, EncodeResult, LoadReport
from qwenvl_pd.protos import auth, convert, qwenvl_pd_pb2 as pb, qwenvl_pd_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
LEASE_CHECK_S = 0.5  # how often expired leases are unpinned
MAX_LEASE_S = 600.0  # a caller may ask for less than the node's default, never for days


class EncodeService(pb_grpc.EncodeServicer):
    def __init__(self, runtime: EncodeRuntime):
        self.rt = runtime
        self.draining = False
        self.hits = 0  # items this side served: pool hits at once, and joins of a queued job
        self._expiry = asyncio.ensure_future(self._expire_leases())

    def in_flight(self) -> int:
        """What a drain waits for: queued or running jobs and the entries prefills may still read."""
        return self.rt.batcher.waiting + self.rt.batcher.running + self.rt.pool.pinned()

    async def _expire_leases(self) -> None:
        while True:
            await asyncio.sleep(LEASE_CHECK_S)
            self.rt.pool.expire()

    async def Encode(self, request, context):
        req = await self._parse(request, context)
        lease_s = min(req.lease_ms / 1000 or self.rt.cfg.lease_seconds, MAX_LEASE_S)
        keys = [embedding_key(m, self.rt.fingerprint) for m in req.media]
        hits = [self.rt.pool.lease_if_ready(k, lease_s) for k in keys]
        waits = [None if hit else self.rt.batcher.submit(k, m, num_tokens(m, self.rt.merge), lease_s)
                 for k, m, hit in zip(keys, req.media, hits)]
        served = await self._served(hits, [w[0] if w else None for w in waits])
        failed = [s for s in served if isinstance(s, BaseException)]
        if failed:
            self.rt.pool.release([s.lease.lease_id for s in served if isinstance(s, Served)])
            await _abort(context, failed[0], req.request_id)
        # a caller that joined a queued job did not cause an encode: a hit like the pool's
        joined = [bool(w and w[1] and s.source == "encoded") for w, s in zip(waits, served)]
        self.hits += sum(1 for h in hits if h) + sum(joined)
        reused = sum(1 for s, j in zip(served, joined) if j or s.source != "encoded")
        return convert.to_proto(EncodeResult(tuple(self._handle(s) for s in served), reused))

    async def _served(self, hits: list, waits: list) -> list:
        """Per item: its Served (a hit now, or the worker's result), or the exception it failed with."""
        futures = [w for w in waits if w]
        try:
            results = await _gather(futures)
        except asyncio.CancelledError:  # the caller went away: nobody will read or release these
            self.rt.pool.release([lease.lease_id for _, lease in filter(None, hits)])
            for fut in futures:
                fut.add_done_callback(self._release_result)
            raise
        return [Served(*hit, "pool") if hit else next(results) for hit in hits]

    def _release_result(self, fut) -> None:
        if not fut.cancelled() and fut.exception() is None:
            self.rt.pool.release([fut.result().lease.lease_id])

    async def _parse(self, request, context) -> EncodeRequest:
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"encode {self.rt.instance_id} is draining; send new work elsewhere")
        try:
            req = convert.from_proto(request)
            limits = {"image": self.rt.cfg.limit_images, "video": self.rt.cfg.limit_videos}
            check_request(req.media, limits, self.rt.cfg.max_encode_batch_tokens, self.rt.merge)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"encode request: {e}")
        return req

    def _handle(self, served: Served) -> EmbeddingHandle:
        entry, cfg = served.entry, self.rt.cfg
        handle = EmbeddingHandle(
            key=entry.key, instance_id=self.rt.instance_id, transfer_address=self.rt.transfer.session_id,
            address=self.rt.base + entry.offset, nbytes=entry.nbytes, num_tokens=entry.num_tokens,
            hidden_size=self.rt.layout.hidden_size, dtype=str(self.rt.dtype).removeprefix("torch."),
            vision_fingerprint=self.rt.fingerprint, num_deepstack=entry.num_deepstack,
            lease_expires_unix_ms=served.lease.expires_unix_ms, control_address=f"{cfg.host}:{cfg.port}",
            lease_id=served.lease.lease_id, in_store=entry.in_store)
        return auth.sign(handle, cfg.cluster_secret) if cfg.cluster_secret else handle

    async def Release(self, request, context):
        rel: EmbeddingRelease = convert.from_proto(request)
        if rel.instance_id and rel.instance_id != self.rt.instance_id:
            return pb.ReleaseResponse(released=False)  # another run's leases are not ours to end
        released = self.rt.pool.release(list(rel.lease_ids))
        return pb.ReleaseResponse(released=released == len(rel.lease_ids))

    async def GetLoad(self, request, context):
        return convert.to_proto(self.load())

    def load(self) -> LoadReport:
        work, pool = self.rt.work, self.rt.pool
        return LoadReport(
            role="encode", instance_id=self.rt.instance_id, running=self.rt.batcher.running,
            waiting=self.rt.batcher.waiting, embedding_hits=self.hits + work.hits,
            embedding_store_hits=work.store_hits, embedding_misses=work.misses,
            encode_seconds_total=work.encode_seconds, embedding_bytes_used=pool.bytes_used(),
            embedding_bytes_total=pool.capacity, embedding_leases=pool.pinned())

    def close(self) -> None:
        self._expiry.cancel()


async def _gather(futures):
    """Each future's result or exception, in order, as an iterator. Shielded: a cancelled caller
    leaves the worker's futures to complete (their leases are then released), never cancelled."""
    done = await asyncio.gather(*(asyncio.shield(asyncio.wrap_future(f)) for f in futures),
                                return_exceptions=True)
    return iter(done)


async def _abort(context, error: BaseException, request_id: str) -> None:
    if isinstance(error, PoolError):
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"encode request {request_id}: {error}")
    if isinstance(error, MediaError):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"encode request {request_id}: {error}")
    log.error("encode request %s failed: %r", request_id, error)
    await context.abort(grpc.StatusCode.INTERNAL, f"encode request {request_id}: {error}")

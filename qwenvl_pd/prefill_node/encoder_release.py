"""Encode.Release of the embedding leases a prefill is done with: best effort and off the
request's path (an unanswered Release costs nothing: the lease expires on the encoder anyway)."""
from __future__ import annotations

import asyncio
import logging
from collections import defaultdict

import grpc

from qwenvl_pd.kv_transfer.embedding_handle import EmbeddingHandle
from qwenvl_pd.messages import EmbeddingRelease
from qwenvl_pd.protos import auth, convert, qwenvl_pd_pb2_grpc as pb_grpc
from qwenvl_pd.protos.channel import CLIENT_OPTIONS
from qwenvl_pd.protos.channel_cache import ChannelCache

log = logging.getLogger(__name__)
RELEASE_TIMEOUT_S = 2.0


class EncoderReleases:
    def __init__(self, cluster_secret: bytes):
        self.channels = ChannelCache(lambda address: auth.channel(address, cluster_secret, CLIENT_OPTIONS))
        self._tasks: set[asyncio.Task] = set()  # kept: a task nobody holds may be collected

    def release(self, handles: list[EmbeddingHandle]) -> None:
        """One Release per encoder instance for the leases of `handles`; returns at once."""
        leases = defaultdict(list)
        for h in handles:
            if h.lease_id and h.control_address:
                leases[(h.control_address, h.instance_id)].append(h.lease_id)
        for (address, instance), ids in leases.items():
            task = asyncio.ensure_future(self._send(address, EmbeddingRelease(tuple(ids), instance)))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @property
    def pending(self) -> int:
        return len(self._tasks)

    async def _send(self, address: str, release: EmbeddingRelease) -> None:
        try:
            stub = pb_grpc.EncodeStub(self.channels.get(address))
            await stub.Release(convert.to_proto(release), timeout=RELEASE_TIMEOUT_S)
        except grpc.RpcError as e:
            log.info("Release of %d embedding lease(s) on %s failed (%s); they expire",
                     len(release.lease_ids), address, e.code().name)

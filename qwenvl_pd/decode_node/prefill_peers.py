"""Decode's side of the prefill instances it reads from: one gRPC channel per prefill (Release
and WatchKV share it) and the Release that confirms a lease."""
from __future__ import annotations

import logging

import grpc

from qwenvl_pd.kv_transfer.handle import KVHandle
from qwenvl_pd.protos import auth, qwenvl_pd_pb2 as pb, qwenvl_pd_pb2_grpc as pb_grpc
from qwenvl_pd.protos.channel import CLIENT_OPTIONS
from qwenvl_pd.protos.channel_cache import ChannelCache

log = logging.getLogger(__name__)


class PrefillPeers:
    def __init__(self, cluster_secret: bytes):
        self.channels = ChannelCache(lambda address: auth.channel(address, cluster_secret, CLIENT_OPTIONS))

    def channel(self, address: str) -> grpc.aio.Channel:
        """The channel to a prefill's gRPC address, opened once (a bounded cache)."""
        return self.channels.get(address)

    async def release(self, h: KVHandle, request_id: str) -> str:
        """Tell prefill the blocks are pulled; "" when it confirms it leased them to us until
        now, else why not. A Release that fails cannot confirm: the lease may have expired and
        the blocks gone to another request while we read."""
        if not h.control_address:
            return ""  # only without the cluster secret: nothing to confirm with
        request = pb.ReleaseRequest(request_id=request_id, instance_id=h.instance_id)
        try:
            channel = self.channel(h.control_address)
            released = (await pb_grpc.PrefillStub(channel).Release(request, timeout=5)).released
        except grpc.RpcError as e:
            log.warning("release of %s on %s failed: %s", request_id, h.control_address, e.code())
            return f"could not be confirmed (Release at {h.control_address}: {e.code().name})"
        return "" if released else "was no longer held (expired, aborted or restarted)"

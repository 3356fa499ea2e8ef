"""Channels to peers named at run time (decode -> a prefill's control address), bounded."""
import asyncio
from collections import OrderedDict
from typing import Callable

import grpc

CHANNELS_KEPT = 64
CLOSE_GRACE_S = 30.0  # an evicted channel's calls in flight get this long to finish


class ChannelCache:
    """One channel per address, opened on first use; past `limit` addresses the least recently
    used is closed, so callers that name ever new addresses cannot grow it without bound."""

    def __init__(self, open_channel: Callable[[str], grpc.aio.Channel], limit: int = CHANNELS_KEPT):
        self.open_channel, self.limit = open_channel, limit
        self._channels: OrderedDict[str, grpc.aio.Channel] = OrderedDict()
        self._closing: set[asyncio.Task] = set()

    def __len__(self) -> int:
        return len(self._channels)

    def get(self, address: str) -> grpc.aio.Channel:
        """The channel to `address` (event loop thread only)."""
        if address in self._channels:
            self._channels.move_to_end(address)
            return self._channels[address]
        channel = self._channels[address] = self.open_channel(address)
        while len(self._channels) > self.limit:
            self._close(self._channels.popitem(last=False)[1])
        return channel

    def _close(self, channel: grpc.aio.Channel) -> None:
        task = asyncio.ensure_future(channel.close(grace=CLOSE_GRACE_S))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

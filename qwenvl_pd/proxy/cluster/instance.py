"""One prefill, decode or encode process as the proxy sees it: its gRPC channel and what the proxy knows
of it (health, requests in flight, the last load report). The one instance type of the proxy:
the router keeps them, the backend and pd_client's calls take them."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import grpc

from qwenvl_pd.messages import LoadReport
from qwenvl_pd.protos import auth
from qwenvl_pd.protos.channel import CLIENT_OPTIONS

# gRPC backs off up to 2 minutes between reconnects; a restarted instance should be back in
# rotation within a few health rounds
RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 500), ("grpc.max_reconnect_backoff_ms", 3000)]


@dataclass(eq=False)
class Instance:
    role: str  # one of messages.ALL_ROLES
    address: str  # host:port
    channel: grpc.aio.Channel
    healthy: bool = False
    inflight: int = 0  # requests this proxy has on it now: fresher than any polled report
    report: LoadReport | None = None
    misses: int = 0  # health checks in a row it did not answer
    # set while it does not answer: calls in flight on it give up instead of waiting for a
    # process that may be stopped (a draining node answers NOT_SERVING and is not lost)
    lost: asyncio.Event = field(default_factory=asyncio.Event)

    @classmethod
    def connect(cls, role: str, address: str, secret: bytes = b"", healthy: bool = False) -> Instance:
        return cls(role, address, auth.channel(address, secret, CLIENT_OPTIONS + RECONNECT_OPTIONS), healthy)

    @property
    def load(self) -> int:
        reported = self.report.running + self.report.waiting if self.report else 0
        return max(self.inflight, reported)

    @property
    def kv_usage(self) -> float:
        r = self.report
        return r.blocks_used / r.blocks_total if r and r.blocks_total else 0.0

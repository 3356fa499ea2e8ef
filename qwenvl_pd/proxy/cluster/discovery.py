"""DNS discovery of prefill, decode and encode instances for the proxy.

``qwenvl-pd proxy --discover-dns SPEC`` with SPEC = ``ROLE=HOST[:PORT][,ROLE=HOST[:PORT]]`` (no spaces),
parsed by :func:`parse_discover_dns`: ROLE is ``prefill`` or ``decode``, each exactly once, and
optionally ``encode`` (at most once; without it prefill runs the vision tower itself); HOST is a
DNS name, in Kubernetes the role's headless Service FQDN (``<svc>.<namespace>.svc.cluster.local``),
or an IP literal (IPv6 in brackets); PORT is the role's gRPC port. Every A/AAAA record of HOST is one
instance, reached at ADDRESS:PORT. Example::

    prefill=pd-prefill.serving.svc.cluster.local:50051,decode=pd-decode.serving.svc.cluster.local:50052

:class:`DnsDiscovery` re-resolves every name each ``interval`` seconds. A new address joins its role's
set only after ``health_check`` passes (failures are retried on later rounds); an address that is no
longer resolved leaves at once; a failed resolution keeps the set as it was, while a name with no
records (NXDOMAIN: a headless Service without ready pods) empties it. ``on_change(role, endpoints)``
(sync or async) runs after each change::

    disc = DnsDiscovery(parse_discover_dns(spec), health_check=grpc_health_check, on_change=cb)
    await disc.start()              # the first round has completed when this returns
    disc.endpoints("prefill")       # frozenset[Endpoint]; Endpoint.target is "10.0.0.7:50051"
    await disc.evict(endpoint)      # the proxy saw it fail: drop it until a health check passes again
    await disc.stop()
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import socket
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass

from qwenvl_pd.messages import ENCODE, ROLES

log = logging.getLogger(__name__)


@dataclass(frozen=True, order=True)
class Endpoint:
    role: str
    address: str  # an IP address as the resolver returned it
    port: int

    @property
    def target(self) -> str:
        """``host:port`` for a gRPC channel (IPv6 in brackets)."""
        return f"[{self.address}]:{self.port}" if ":" in self.address else f"{self.address}:{self.port}"


Resolver = Callable[[str, int], Awaitable[Iterable[str]]]
HealthCheck = Callable[[Endpoint], Awaitable[bool]]
OnChange = Callable[[str, frozenset[Endpoint]], Awaitable[None] | None]


# the node CLIs' default ports, for ROLE=HOST entries without one
DEFAULT_PORTS = {"prefill": 50051, "decode": 50052, ENCODE: 50053}


def parse_discover_dns(spec: str, roles: Collection[str] = ROLES,
                       optional: Collection[str] = (ENCODE,)) -> dict[str, tuple[str, int]]:
    """Parse ``ROLE=HOST[:PORT],...``; every role in ``roles`` exactly once, those in ``optional``
    at most once. Raises ValueError."""
    known, out = (*roles, *optional), {}  # out: role -> (host, port)
    for item in spec.split(","):
        role, sep, hostport = item.partition("=")
        if hostport and ":" not in hostport.strip("[]") and role in DEFAULT_PORTS:
            hostport = f"{hostport}:{DEFAULT_PORTS[role]}"
        host, sep2, port_s = hostport.rpartition(":")
        if not sep or not sep2 or not host or not port_s.isdigit():
            raise ValueError(f"--discover-dns entry {item!r} is not ROLE=HOST[:PORT]")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host:
            raise ValueError(f"--discover-dns entry {item!r}: put an IPv6 address in brackets")
        if role not in known or role in out:
            raise ValueError(f"--discover-dns role {role!r} is unknown or repeated (roles: {', '.join(known)})")
        if not 0 < int(port_s) < 65536:
            raise ValueError(f"--discover-dns entry {item!r}: port out of range")
        out[role] = (host, int(port_s))
    if missing := [r for r in roles if r not in out]:
        raise ValueError(f"--discover-dns lacks role(s): {', '.join(missing)}")
    return out


async def getaddrinfo_resolver(host: str, port: int) -> list[str]:
    """A/AAAA addresses of ``host`` via the system resolver; [] when the name does not exist."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        if e.errno in {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}:
            return []
        raise
    return sorted({str(info[4][0]) for info in infos})


async def grpc_health_check(endpoint: Endpoint, timeout: float = 2.0) -> bool:
    """Standard grpc.health.v1 ``Check`` of the whole server (service ""): True when SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(endpoint.target) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.aio.AioRpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


class DnsDiscovery:
    """The healthy instances of each role, kept up to date from DNS (see the module docstring)."""

    def __init__(self, targets: Mapping[str, tuple[str, int]], *, health_check: HealthCheck | None = None,
                 on_change: OnChange | None = None, resolver: Resolver = getaddrinfo_resolver,
                 interval: float = 5.0, timeout: float = 5.0) -> None:
        if interval <= 0 or timeout <= 0:
            raise ValueError("interval and timeout must be positive")
        self._targets = dict(targets)
        self._health_check, self._on_change, self._resolver = health_check, on_change, resolver
        self._interval, self._timeout = interval, timeout
        self._members: dict[str, frozenset[Endpoint]] = {role: frozenset() for role in self._targets}
        self._lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def endpoints(self, role: str) -> frozenset[Endpoint]:
        return self._members[role]

    def snapshot(self) -> dict[str, frozenset[Endpoint]]:
        return dict(self._members)

    async def refresh(self) -> None:
        """One round: resolve every role, health-check new addresses, drop vanished ones."""
        async with self._lock:
            changed = await asyncio.gather(*(self._refresh_role(role) for role in self._targets))
        await self._notify([role for role, c in zip(self._targets, changed) if c])

    async def evict(self, endpoint: Endpoint) -> None:
        async with self._lock:
            current = self._members.get(endpoint.role, frozenset())
            if endpoint not in current:
                return
            self._members[endpoint.role] = current - {endpoint}
        await self._notify([endpoint.role])

    async def start(self) -> None:
        if self._task is None:
            self._stopping.clear()
            await self.refresh()
            self._task = asyncio.create_task(self._run(), name="qwenvl-pd-dns-discovery")

    async def stop(self) -> None:
        self._stopping.set()
        task, self._task = self._task, None
        if task is not None:
            await task

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                await asyncio.wait_for(self._stopping.wait(), self._interval)
            except asyncio.TimeoutError:
                try:
                    await self.refresh()
                except Exception:  # a bad on_change must not end discovery
                    log.exception("DNS discovery round failed")

    async def _refresh_role(self, role: str) -> bool:
        host, port = self._targets[role]
        try:
            addresses = await asyncio.wait_for(self._resolver(host, port), self._timeout)
            seen = {Endpoint(role, str(a), port) for a in addresses}
        except Exception as e:  # transient failure: keep what we have
            log.warning("resolving %s for %s failed: %r", host, role, e)
            return False
        current = self._members[role]
        new = sorted(seen - current)
        passed = await asyncio.gather(*(self._check(ep) for ep in new))
        members = (current & seen) | {ep for ep, ok in zip(new, passed) if ok}
        self._members[role] = frozenset(members)
        return members != current

    async def _check(self, endpoint: Endpoint) -> bool:
        if self._health_check is None:
            return True
        try:
            return bool(await asyncio.wait_for(self._health_check(endpoint), self._timeout))
        except Exception as e:
            log.info("health check of %s %s failed: %r", endpoint.role, endpoint.target, e)
            return False

    async def _notify(self, roles: list[str]) -> None:
        # Outside the lock, so a callback may call evict(); it sees the sets as they are now.
        if self._on_change is None:
            return
        for role in roles:
            result = self._on_change(role, self._members[role])
            if inspect.isawaitable(result):
                await result

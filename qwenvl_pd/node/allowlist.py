"""The peers a node may contact at addresses a caller names (a KV handle's prefill, an embedding
handle's encoder) when no cluster secret vouches for the handle: the hosts of an --allowed-* flag
(host[:port] or DNS names, what the proxy is given), resolved again every RESOLVE_S so scaled or
restarted pods are found. An address passes when every IP its host resolves to is an allowed
host's: a name that resolves anywhere else, or nowhere, is refused."""
from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterable

RESOLVE_S = 10.0


def host_of(address: str) -> str:
    """"host:port", "[v6]:port" or a bare host -> the host."""
    if address.startswith("["):
        return address[1:address.index("]")]
    return address.rsplit(":", 1)[0] if address.count(":") == 1 else address


class HostAllowList:
    def __init__(self, entries: Iterable[str], flag: str, peer: str):
        """flag: the option that set it; peer: what an allowed host is ("a prefill this decode
        reads from"), both for the refusal."""
        self.hosts = tuple(dict.fromkeys(host_of(e.strip()) for e in entries if e.strip()))
        self.flag, self.peer = flag, peer
        self._ips: frozenset[str] = frozenset()
        self._resolved_at = -RESOLVE_S

    def __bool__(self) -> bool:
        return bool(self.hosts)

    async def refusal(self, what: str, addresses: Iterable[str]) -> str | None:
        """None when the host of every address (empty ones skipped) is allowed, else why not;
        `what` names what carried them ("the KV handle")."""
        allowed = await self._allowed_ips()
        hosts = [host_of(a) for a in addresses if a]
        outside = [host for host in hosts if not await _resolves_within(host, allowed)]
        if not outside:
            return None
        return (f"{what} names {', '.join(sorted(set(outside)))}, not {self.peer} "
                f"({self.flag} {','.join(self.hosts)})")

    async def _allowed_ips(self) -> frozenset[str]:
        if time.monotonic() - self._resolved_at >= RESOLVE_S:
            found = await asyncio.gather(*(_resolve(host) for host in self.hosts))
            self._ips, self._resolved_at = frozenset().union(*found), time.monotonic()
        return self._ips


async def _resolves_within(host: str, allowed: frozenset[str]) -> bool:
    ips = await _resolve(host)
    return bool(ips) and ips <= allowed


async def _resolve(host: str) -> frozenset[str]:
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return frozenset()
    return frozenset(info[4][0] for info in infos)

"""The prefills a decode reads KV from: the hosts of --allowed-prefills (what the proxy's --prefill
gets: host:port or DNS names), resolved again every RESOLVE_S so scaled or restarted pods are
found. Without it (and without a cluster secret) decode would contact whatever control and
transfer address a caller names."""
from __future__ import annotations

import asyncio
import socket
import time

from qwenvl_pd.kv_transfer.handle import KVHandle

RESOLVE_S = 10.0


def host_of(address: str) -> str:
    """"host:port", "[v6]:port" or a bare host -> the host."""
    if address.startswith("["):
        return address[1:address.index("]")]
    return address.rsplit(":", 1)[0] if address.count(":") == 1 else address


def handle_hosts(h: KVHandle) -> list[str]:
    """Every host a read of this handle contacts: its Release address and each rank's engine."""
    return [host_of(a) for a in (h.control_address, *(s.transfer_address for s in h.segments)) if a]


class PrefillAllowList:
    def __init__(self, entries: tuple[str, ...]):
        self.hosts = tuple(dict.fromkeys(host_of(e) for e in entries if e.strip()))
        self._ips: frozenset[str] = frozenset()
        self._resolved_at = -RESOLVE_S

    def __bool__(self) -> bool:
        return bool(self.hosts)

    async def refusal(self, h: KVHandle) -> str | None:
        """None when every host the handle names is an allowed prefill's, else why not."""
        allowed = await self._allowed_ips()
        outside = [host for host in handle_hosts(h) if not await _resolves_within(host, allowed)]
        if not outside:
            return None
        return (f"the KV handle names {', '.join(sorted(set(outside)))}, not a prefill this decode reads "
                f"from (--allowed-prefills {','.join(self.hosts)})")

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

"""Refuse media URLs that point into the proxy's own network (SSRF guard).

A hostname is resolved once, every address is classified, and the fetch then connects to one of
those very addresses (media.py pins it), so a DNS answer that changes between the check and the
connect (rebinding) cannot slip a private address through. Addresses that embed an IPv4 address
(IPv4-mapped, IPv4-compatible, NAT64, 6to4) are judged by the IPv4 address they lead to.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import Literal, Union

__all__ = ["Category", "BlockedAddressError", "classify", "check_url_host", "getaddrinfo_resolver"]

Category = Literal["public", "private", "loopback", "link_local", "multicast", "unspecified", "reserved"]
IP = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
Resolver = Callable[[str, int], Awaitable[Iterable[str]]]

# private use that Python's is_private does not single out from other special ranges
_PRIVATE = tuple(ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",
    "100.64.0.0/10",  # carrier-grade NAT: often the cluster's own pod or node network
    "fc00::/7",  # unique local
    "fec0::/10",  # deprecated site-local, still routable inside some networks
))
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class BlockedAddressError(ValueError):
    """The host resolves to an address the proxy must not fetch from."""


def _embedded_v4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    # NAT64, and the deprecated IPv4-compatible ::a.b.c.d that some stacks still tunnel
    if ip in _NAT64 or (int(ip) >> 32 == 0 and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.sixtofour


def classify(ip: str | IP) -> Category:
    """What kind of address this is; only "public" is fetchable by default."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0] if isinstance(ip, str) else ip)  # drop zone id
    if isinstance(addr, ipaddress.IPv6Address) and (v4 := _embedded_v4(addr)) is not None:
        return classify(v4)
    if addr.is_unspecified:
        return "unspecified"
    if addr.is_loopback:
        return "loopback"
    if addr.is_link_local:
        return "link_local"
    if addr.is_multicast:
        return "multicast"
    if any(addr in net for net in _PRIVATE if net.version == addr.version):
        return "private"
    # documentation, benchmarking, 0/8, 240/4, broadcast, IETF protocol ranges, ...
    return "public" if addr.is_global and not addr.is_reserved else "reserved"


async def getaddrinfo_resolver(host: str, port: int) -> list[str]:
    """Every address of host, as the system resolver returns them (off the event loop)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _literal(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host.strip("[]").split("%", 1)[0]))
    except ValueError:
        return None


async def check_url_host(host: str, allow_private: bool, port: int = 443,
                         resolver: Resolver = getaddrinfo_resolver) -> list[str]:
    """Resolve host and return its addresses; raise BlockedAddressError when ANY address is not
    public (unless allow_private), since a client cannot choose which one a later connect uses."""
    if not host:
        raise BlockedAddressError("the URL has no host")
    literal = _literal(host)
    try:
        addrs = [literal] if literal else list(await resolver(host, port))
    except (OSError, UnicodeError) as e:
        raise BlockedAddressError(f"cannot resolve host {host!r}: {e}") from None
    if not addrs:
        raise BlockedAddressError(f"host {host!r} has no addresses")
    if not allow_private:
        for addr in addrs:
            kind = classify(addr)
            if kind != "public":
                raise BlockedAddressError(f"host {host!r} resolves to a {kind} address ({addr}); "
                                          "fetching from non-public addresses is disabled")
    return addrs

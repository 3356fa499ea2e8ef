"""Address classification and host checks; no connection is made anywhere in this file."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from qwenvl_pd.proxy.prompt.netguard import BlockedAddressError, check_url_host, classify


@pytest.mark.parametrize("ip, kind", [
    ("8.8.8.8", "public"),
    ("1.1.1.1", "public"),
    ("2606:4700:4700::1111", "public"),
    ("127.0.0.1", "loopback"),
    ("127.255.0.9", "loopback"),
    ("::1", "loopback"),
    ("10.1.2.3", "private"),
    ("172.16.0.1", "private"),
    ("172.31.255.255", "private"),
    ("192.168.1.1", "private"),
    ("100.64.0.1", "private"),  # CGNAT
    ("100.127.255.254", "private"),
    ("fd00::1", "private"),  # unique local
    ("fec0::1", "private"),  # site local
    ("169.254.169.254", "link_local"),  # cloud metadata
    ("fe80::1", "link_local"),
    ("fe80::1%eth0", "link_local"),
    ("224.0.0.1", "multicast"),
    ("239.1.1.1", "multicast"),
    ("ff02::1", "multicast"),
    ("0.0.0.0", "unspecified"),
    ("::", "unspecified"),
    ("0.1.2.3", "reserved"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "reserved"),
    ("192.0.2.10", "reserved"),  # documentation
    ("198.18.0.1", "reserved"),  # benchmarking
    ("2001:db8::1", "reserved"),  # documentation
    # IPv6 forms that lead to an IPv4 address are judged by that address
    ("::ffff:127.0.0.1", "loopback"),
    ("::ffff:10.0.0.1", "private"),
    ("::ffff:169.254.169.254", "link_local"),
    ("::ffff:8.8.8.8", "public"),
    ("64:ff9b::7f00:1", "loopback"),  # NAT64 of 127.0.0.1
    ("64:ff9b::808:808", "public"),
    ("2002:7f00:1::", "loopback"),  # 6to4 of 127.0.0.1
    ("2002:a00:1::", "private"),  # 6to4 of 10.0.0.1
    ("::7f00:1", "loopback"),  # deprecated IPv4-compatible form
    ("::a00:1", "private"),
    ("4000::1", "reserved"),  # IANA-reserved IPv6 space
])
def test_classify(ip, kind):
    assert classify(ip) == kind


def test_classify_accepts_address_objects():
    assert classify(ipaddress.ip_address("10.0.0.1")) == "private"
    assert classify(ipaddress.ip_address("::ffff:7f00:1")) == "loopback"


def test_classify_rejects_non_addresses():
    with pytest.raises(ValueError):
        classify("example.com")


class FakeResolver:
    def __init__(self, answers: dict[str, list[str] | Exception]) -> None:
        self.answers, self.calls = answers, []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append((host, port))
        answer = self.answers.get(host, [])
        if isinstance(answer, Exception):
            raise answer
        return answer


def check(host, allow_private=False, resolver=None, port=443):
    return asyncio.run(check_url_host(host, allow_private, port, resolver or FakeResolver({})))


def test_public_host_returns_all_addresses():
    dns = FakeResolver({"img.example": ["93.184.216.34", "2606:2800:220:1::1"]})
    assert check("img.example", resolver=dns, port=80) == ["93.184.216.34", "2606:2800:220:1::1"]
    assert dns.calls == [("img.example", 80)]


def test_any_private_address_refuses_the_host():
    dns = FakeResolver({"rebind.example": ["93.184.216.34", "10.0.0.5"]})
    with pytest.raises(BlockedAddressError, match="private address .*10.0.0.5"):
        check("rebind.example", resolver=dns)
    assert check("rebind.example", allow_private=True, resolver=dns) == ["93.184.216.34", "10.0.0.5"]


@pytest.mark.parametrize("host", ["127.0.0.1", "[::1]", "::ffff:127.0.0.1", "169.254.169.254", "0.0.0.0"])
def test_ip_literals_are_checked_without_resolving(host):
    dns = FakeResolver({})
    with pytest.raises(BlockedAddressError):
        check(host, resolver=dns)
    assert dns.calls == []


def test_localhost_name_is_refused_by_its_address():
    with pytest.raises(BlockedAddressError, match="loopback"):
        check("localhost", resolver=FakeResolver({"localhost": ["127.0.0.1", "::1"]}))


def test_resolution_failures_and_empty_answers():
    dns = FakeResolver({"gone.example": OSError("Name or service not known"), "empty.example": []})
    with pytest.raises(BlockedAddressError, match="cannot resolve"):
        check("gone.example", resolver=dns)
    with pytest.raises(BlockedAddressError, match="no addresses"):
        check("empty.example", allow_private=True, resolver=dns)
    with pytest.raises(BlockedAddressError, match="no host"):
        check("", allow_private=True, resolver=dns)

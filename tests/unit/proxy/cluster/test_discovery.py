"""DnsDiscovery with a resolver and health checks the test controls; loopback only, bounded loops."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from qwenvl_pd.proxy.cluster.discovery import (
    DnsDiscovery,
    Endpoint,
    getaddrinfo_resolver,
    grpc_health_check,
    parse_discover_dns,
)

PREFILL = ("pd-prefill.serving.svc.cluster.local", 50051)
DECODE = ("pd-decode.serving.svc.cluster.local", 50052)
TARGETS = {"prefill": PREFILL, "decode": DECODE}


class FakeDns:
    """Records per name, edited by the test; a name mapped to an exception raises it."""

    def __init__(self) -> None:
        self.records: dict[str, list[str] | Exception] = {}
        self.calls = 0

    async def __call__(self, host: str, port: int) -> Iterable[str]:
        self.calls += 1
        answer = self.records.get(host, [])
        if isinstance(answer, Exception):
            raise answer
        return list(answer)


class Health:
    """Health by address: True / False / an exception to raise / 'hang'."""

    def __init__(self) -> None:
        self.state: dict[str, object] = {}
        self.checked: list[str] = []

    async def __call__(self, ep: Endpoint) -> bool:
        self.checked.append(ep.address)
        state = self.state.get(ep.address, True)
        if state == "hang":
            await asyncio.sleep(3600)
        if isinstance(state, Exception):
            raise state
        return bool(state)


def addrs(disc: DnsDiscovery, role: str) -> set[str]:
    return {ep.address for ep in disc.endpoints(role)}


def run(coro):  # no pytest-asyncio in this project
    return asyncio.run(asyncio.wait_for(coro, timeout=20))


# --- the --discover-dns format -------------------------------------------------------------------


def test_parse_discover_dns_names_and_ports() -> None:
    spec = "prefill=pd-prefill.serving.svc.cluster.local:50051,decode=pd-decode.serving.svc.cluster.local:50052"
    assert parse_discover_dns(spec) == TARGETS
    assert parse_discover_dns("decode=[fd00::5]:7,prefill=10.0.0.1:6") == {
        "decode": ("fd00::5", 7), "prefill": ("10.0.0.1", 6)}


def test_parse_discover_dns_takes_an_optional_encode_role() -> None:
    assert parse_discover_dns("prefill=p:1,decode=d:2,encode=e") == {
        "prefill": ("p", 1), "decode": ("d", 2), "encode": ("e", 50053)}
    with pytest.raises(ValueError, match="'encode' is unknown or repeated"):
        parse_discover_dns("prefill=p:1,decode=d:2,encode=e:3,encode=f:3")
    with pytest.raises(ValueError, match="lacks role\\(s\\): decode"):
        parse_discover_dns("prefill=p:1,encode=e:3")


@pytest.mark.parametrize("spec, fragment", [
    ("prefill=a:1", "lacks role(s): decode"),
    ("prefill=a:1,decode=b:2,prefill=c:3", "'prefill' is unknown or repeated"),
    ("prefill=a:1,encoder=b:2", "'encoder' is unknown or repeated"),
    ("prefill=a:x,decode=b:2", "is not ROLE=HOST"),
    ("prefill:a:1,decode=b:2", "is not ROLE=HOST"),
    ("prefill=:1,decode=b:2", "is not ROLE=HOST"),
    ("prefill=a:0,decode=b:2", "port out of range"),
    ("prefill=a:70000,decode=b:2", "port out of range"),
    ("prefill=fd00::5:1,decode=b:2", "IPv6 address in brackets"),
])
def test_parse_discover_dns_rejects(spec: str, fragment: str) -> None:
    with pytest.raises(ValueError, match="--discover-dns") as info:
        parse_discover_dns(spec)
    assert fragment in str(info.value)


def test_endpoint_target_brackets_ipv6() -> None:
    assert Endpoint("prefill", "10.1.2.3", 50051).target == "10.1.2.3:50051"
    assert Endpoint("decode", "fd00::7", 50052).target == "[fd00::7]:50052"


# --- membership ----------------------------------------------------------------------------------


def test_adds_healthy_drops_vanished_and_reports_changes() -> None:
    dns, hc, changes = FakeDns(), Health(), []

    async def main() -> None:
        disc = DnsDiscovery(TARGETS, resolver=dns, health_check=hc,
                            on_change=lambda role, eps: changes.append((role, {e.address for e in eps})))
        dns.records = {PREFILL[0]: ["10.0.0.1", "10.0.0.2"], DECODE[0]: ["10.0.1.1"]}
        await disc.refresh()
        assert addrs(disc, "prefill") == {"10.0.0.1", "10.0.0.2"}
        assert addrs(disc, "decode") == {"10.0.1.1"}
        assert disc.endpoints("prefill") == {Endpoint("prefill", "10.0.0.1", 50051),
                                             Endpoint("prefill", "10.0.0.2", 50051)}
        assert sorted(changes) == [("decode", {"10.0.1.1"}), ("prefill", {"10.0.0.1", "10.0.0.2"})]

        # Unchanged records: no health checks of members, no change callback.
        changes.clear(); hc.checked.clear()
        await disc.refresh()
        assert changes == [] and hc.checked == []

        # One prefill pod goes away, one arrives; decode scales out.
        dns.records = {PREFILL[0]: ["10.0.0.2", "10.0.0.3"], DECODE[0]: ["10.0.1.1", "10.0.1.2"]}
        await disc.refresh()
        assert addrs(disc, "prefill") == {"10.0.0.2", "10.0.0.3"}
        assert addrs(disc, "decode") == {"10.0.1.1", "10.0.1.2"}
        assert sorted(hc.checked) == ["10.0.0.3", "10.0.1.2"]
        assert disc.snapshot() == {"prefill": disc.endpoints("prefill"), "decode": disc.endpoints("decode")}

    run(main())


def test_failed_health_check_is_not_added_until_it_passes() -> None:
    dns, hc = FakeDns(), Health()

    async def main() -> None:
        disc = DnsDiscovery(TARGETS, resolver=dns, health_check=hc, timeout=0.2)
        dns.records = {PREFILL[0]: ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"], DECODE[0]: []}
        hc.state = {"10.0.0.2": False, "10.0.0.3": RuntimeError("connection refused"), "10.0.0.4": "hang"}
        await disc.refresh()
        assert addrs(disc, "prefill") == {"10.0.0.1"}

        hc.state = {"10.0.0.4": False}  # .2 and .3 recover, .4 now answers NOT_SERVING
        hc.checked.clear()
        await disc.refresh()
        assert sorted(hc.checked) == ["10.0.0.2", "10.0.0.3", "10.0.0.4"]
        assert addrs(disc, "prefill") == {"10.0.0.1", "10.0.0.2", "10.0.0.3"}
        assert addrs(disc, "decode") == set()

    run(main())


def test_resolver_error_keeps_set_and_nxdomain_empties_it() -> None:
    dns, changes = FakeDns(), []

    async def main() -> None:
        disc = DnsDiscovery(TARGETS, resolver=dns, on_change=lambda role, eps: changes.append(role))
        dns.records = {PREFILL[0]: ["10.0.0.1"], DECODE[0]: ["10.0.1.1"]}
        await disc.refresh()
        changes.clear()

        dns.records = {PREFILL[0]: OSError("temporary failure in name resolution"), DECODE[0]: []}
        await disc.refresh()
        assert addrs(disc, "prefill") == {"10.0.0.1"}  # kept: the lookup failed
        assert addrs(disc, "decode") == set()           # emptied: no records
        assert changes == ["decode"]

    run(main())


def test_slow_resolver_times_out_and_keeps_set() -> None:
    dns = FakeDns()

    async def main() -> None:
        disc = DnsDiscovery(TARGETS, resolver=dns, timeout=0.1)
        dns.records = {PREFILL[0]: ["10.0.0.1"], DECODE[0]: ["10.0.1.1"]}
        await disc.refresh()

        async def hanging(host: str, port: int) -> list[str]:
            await asyncio.sleep(3600)
            return []

        disc._resolver = hanging
        await disc.refresh()
        assert addrs(disc, "prefill") == {"10.0.0.1"} and addrs(disc, "decode") == {"10.0.1.1"}

    run(main())


def test_evict_drops_until_health_check_passes_again() -> None:
    dns, hc, changes = FakeDns(), Health(), []

    async def main() -> None:
        async def on_change(role: str, eps: frozenset[Endpoint]) -> None:  # async callbacks are awaited
            changes.append((role, {e.address for e in eps}))

        disc = DnsDiscovery(TARGETS, resolver=dns, health_check=hc, on_change=on_change)
        dns.records = {PREFILL[0]: ["10.0.0.1", "10.0.0.2"], DECODE[0]: []}
        await disc.refresh()
        changes.clear()

        await disc.evict(Endpoint("prefill", "10.0.0.1", 50051))
        await disc.evict(Endpoint("prefill", "10.9.9.9", 50051))  # not a member: no-op
        assert addrs(disc, "prefill") == {"10.0.0.2"}
        assert changes == [("prefill", {"10.0.0.2"})]

        hc.state = {"10.0.0.1": False}
        await disc.refresh()
        assert addrs(disc, "prefill") == {"10.0.0.2"}
        hc.state = {}
        await disc.refresh()
        assert addrs(disc, "prefill") == {"10.0.0.1", "10.0.0.2"}

    run(main())


def test_background_loop_follows_dns_and_stops_cleanly() -> None:
    dns, seen = FakeDns(), []

    async def main() -> None:
        disc = DnsDiscovery(TARGETS, resolver=dns, interval=0.01,
                            on_change=lambda role, eps: seen.append((role, {e.address for e in eps})))
        dns.records = {PREFILL[0]: ["10.0.0.1"], DECODE[0]: ["10.0.1.1"]}
        await disc.start()
        assert addrs(disc, "prefill") == {"10.0.0.1"}  # start() completes a first round

        dns.records = {PREFILL[0]: ["10.0.0.1", "10.0.0.2"], DECODE[0]: []}
        for _ in range(500):  # bounded: at most ~5 s
            if addrs(disc, "prefill") == {"10.0.0.1", "10.0.0.2"} and addrs(disc, "decode") == set():
                break
            await asyncio.sleep(0.01)
        assert addrs(disc, "prefill") == {"10.0.0.1", "10.0.0.2"}
        assert addrs(disc, "decode") == set()
        assert ("prefill", {"10.0.0.1", "10.0.0.2"}) in seen and ("decode", set()) in seen

        await disc.stop()
        calls = dns.calls
        await asyncio.sleep(0.1)
        assert dns.calls == calls  # no rounds after stop()
        await disc.stop()  # idempotent

    run(main())


def test_failing_on_change_does_not_kill_the_loop() -> None:
    dns = FakeDns()

    async def main() -> None:
        def boom(role: str, eps: frozenset[Endpoint]) -> None:
            raise RuntimeError("callback bug")

        disc = DnsDiscovery(TARGETS, resolver=dns, interval=0.01, on_change=boom)
        await disc.start()
        dns.records = {PREFILL[0]: ["10.0.0.1"], DECODE[0]: []}
        for _ in range(500):
            if addrs(disc, "prefill") == {"10.0.0.1"}:
                break
            await asyncio.sleep(0.01)
        calls = dns.calls
        for _ in range(500):
            if dns.calls > calls + 2:
                break
            await asyncio.sleep(0.01)
        assert addrs(disc, "prefill") == {"10.0.0.1"} and dns.calls > calls + 2
        await disc.stop()

    run(main())


def test_rejects_nonpositive_interval() -> None:
    with pytest.raises(ValueError):
        DnsDiscovery(TARGETS, interval=0)


# --- the default resolver and the gRPC health check, on loopback ----------------------------------


def test_getaddrinfo_resolver_numeric_hosts() -> None:
    assert run(getaddrinfo_resolver("127.0.0.1", 50051)) == ["127.0.0.1"]
    assert run(getaddrinfo_resolver("::1", 50051)) == ["::1"]


def test_default_resolver_drives_discovery_on_loopback() -> None:
    async def main() -> set[str]:
        disc = DnsDiscovery({"prefill": ("127.0.0.1", 1), "decode": ("127.0.0.1", 2)})
        await disc.refresh()
        return {ep.target for role in ("prefill", "decode") for ep in disc.endpoints(role)}

    assert run(main()) == {"127.0.0.1:1", "127.0.0.1:2"}


def test_grpc_health_check_against_a_real_server() -> None:
    async def main() -> None:
        server = grpc.aio.server()
        servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            ep = Endpoint("prefill", "127.0.0.1", port)
            await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
            assert await grpc_health_check(ep) is True
            await servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            assert await grpc_health_check(ep) is False

            # Discovery admits it only while it is SERVING.
            disc = DnsDiscovery({"prefill": ("127.0.0.1", port), "decode": ("127.0.0.1", port)},
                                health_check=grpc_health_check)
            await disc.refresh()
            assert disc.endpoints("prefill") == frozenset()
            await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
            await disc.refresh()
            assert disc.endpoints("prefill") == {ep}
        finally:
            await server.stop(None)
        assert await grpc_health_check(ep, timeout=1.0) is False  # nothing listens any more

    run(main())


def test_discover_dns_port_defaults_to_the_node_default():
    assert parse_discover_dns("prefill=p.svc,decode=d.svc:7000") == {
        "prefill": ("p.svc", 50051), "decode": ("d.svc", 7000)}

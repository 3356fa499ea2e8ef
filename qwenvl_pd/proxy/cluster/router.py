"""Which prefill, decode and (optional) encode instance serve a request.

Instances come from static lists and/or DNS discovery. A health loop (grpc.health.v1) drops dead
instances and brings them back; a load loop polls GetLoad for routing and metrics. Prefill is
chosen by rendezvous hashing of an affinity key (the prompt's first block and its image hashes),
so repeated prefixes and images land where their KV prefix and vision encodings are cached,
unless that instance is at the load cap; then, and for decode, the least loaded instance wins,
with ties taken in turn so that an idle cluster still spreads its work. An encoder is chosen the
same way by the request's first media content hash, so a repeated image meets its cached
embeddings. The encode role is optional: the cluster is ready without one.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from qwenvl_pd.messages import ALL_ROLES, ENCODE, ROLES, LoadReport
from qwenvl_pd.proxy.cluster import pd_client
from qwenvl_pd.proxy.cluster.instance import Instance
from qwenvl_pd.proxy.errors import no_backend
from qwenvl_pd.proxy.metrics import ProxyMetrics

log = logging.getLogger(__name__)
RPC_TIMEOUT_S = 2.0
LOST_AFTER = 2  # health checks in a row without an answer: the instance is hung or cut off


def affinity_key(token_ids: Sequence[int], image_hashes: Iterable[str], num_tokens: int) -> bytes:
    h = hashlib.sha256(",".join(map(str, token_ids[:num_tokens])).encode())
    for digest in image_hashes:
        h.update(b"|" + digest.encode())
    return h.digest()


def _rendezvous(key: bytes, address: str) -> int:
    return int.from_bytes(hashlib.sha256(key + address.encode()).digest()[:8], "big")


async def grpc_healthy(instance: Instance) -> bool | None:
    """SERVING: True; another status: False; no answer in time (or no connection): None."""
    try:
        reply = await health_pb2_grpc.HealthStub(instance.channel).Check(
            health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT_S)
    except grpc.aio.AioRpcError as e:
        no_answer = e.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
        return None if no_answer else False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


class Router:
    def __init__(self, metrics: ProxyMetrics, prefill_load_cap: int = 8,
                 health_interval_s: float = 2.0, load_interval_s: float = 1.0,
                 health_check: Callable = grpc_healthy, secret: bytes = b"", encode_load_cap: int = 8):
        self.metrics, self.secret = metrics, secret
        self.cap, self.encode_cap = prefill_load_cap, encode_load_cap
        self.health_interval_s, self.load_interval_s = health_interval_s, load_interval_s
        self._check = health_check
        self.instances: dict[str, dict[str, Instance]] = {r: {} for r in ALL_ROLES}
        self._turn = itertools.count()  # breaks load ties in turn
        self._tasks: list[asyncio.Task] = []

    # ---- membership
    def set_members(self, role: str, addresses: Iterable[str], healthy: bool = False) -> None:
        """Make `addresses` the role's instances; new ones start `healthy` (discovery has just
        checked them) or wait for the next health round."""
        wanted, current = set(addresses), self.instances[role]
        for address in sorted(wanted - set(current)):
            current[address] = Instance.connect(role, address, self.secret, healthy)
        for address in sorted(set(current) - wanted):
            self._drop(current.pop(address))

    def _drop(self, state: Instance) -> None:
        if state.report is not None:
            self.metrics.forget_instance(state.role, state.report.instance_id)
        asyncio.ensure_future(state.channel.close())

    def healthy(self, role: str) -> list[Instance]:
        return [s for s in self.instances[role].values() if s.healthy]

    def ready(self) -> bool:
        return all(self.healthy(role) for role in ROLES)  # an encoder is optional

    def mark_failed(self, state: Instance) -> None:
        """A request saw it fail: route around it until a health check passes again."""
        if state.healthy:
            log.warning("%s %s failed a request; out of rotation until healthy", state.role, state.address)
        state.healthy = False

    # ---- choice
    def _least_loaded(self, candidates: list[Instance]) -> Instance:
        best = min((s.load, s.kv_usage) for s in candidates)
        tied = [s for s in candidates if (s.load, s.kv_usage) == best]
        return tied[next(self._turn) % len(tied)]

    def _candidates(self, role: str, exclude: Iterable[Instance]) -> list[Instance]:
        skip = set(map(id, exclude))
        found = [s for s in self.healthy(role) if id(s) not in skip]
        if not found:
            raise no_backend(role)
        return found

    def _affine(self, candidates: list[Instance], key: bytes, cap: int) -> Instance:
        preferred = max(candidates, key=lambda s: _rendezvous(key, s.address))
        return preferred if preferred.load < cap else self._least_loaded(candidates)

    def pick_prefill(self, key: bytes, exclude: Iterable[Instance] = ()) -> Instance:
        return self._affine(self._candidates("prefill", exclude), key, self.cap)

    def pick_encode(self, content_hash: str, exclude: Iterable[Instance] = ()) -> Instance | None:
        """The encoder for media whose first item has this hash (with `exclude` tried: the next in
        rendezvous order); None when no other is healthy."""
        skip = set(map(id, exclude))
        candidates = [s for s in self.healthy(ENCODE) if id(s) not in skip]
        return self._affine(candidates, content_hash.encode(), self.encode_cap) if candidates else None

    def pick_decode(self, exclude: Iterable[Instance] = ()) -> Instance:
        return self._least_loaded(self._candidates("decode", exclude))

    @contextlib.contextmanager
    def using(self, state: Instance) -> Iterator[Instance]:
        state.inflight += 1
        try:
            yield state
        finally:
            state.inflight -= 1

    # ---- background rounds
    async def health_round(self) -> None:
        states = [s for role in ALL_ROLES for s in self.instances[role].values()]
        results = await asyncio.gather(*(self._check(s) for s in states))
        for state, ok in zip(states, results):
            if bool(ok) != state.healthy:
                (log.info if ok else log.warning)("%s %s is %s", state.role, state.address,
                                                  "healthy" if ok else "UNHEALTHY")
            state.healthy = bool(ok)
            self._count_miss(state, ok is None)

    @staticmethod
    def _count_miss(state: Instance, missed: bool) -> None:
        state.misses = state.misses + 1 if missed else 0
        if state.misses == LOST_AFTER:
            log.warning("%s %s has not answered %d health checks; giving up its calls in flight",
                        state.role, state.address, LOST_AFTER)
            state.lost.set()
        elif not missed:
            state.lost.clear()

    async def load_round(self) -> None:
        states = [s for role in ALL_ROLES for s in self.healthy(role)]
        reports = await asyncio.gather(*(pd_client.load(s, s.role) for s in states),
                                       return_exceptions=True)
        for state, report in zip(states, reports):
            if isinstance(report, LoadReport):
                state.report = report
                self.metrics.observe_load(report)

    async def start(self) -> None:
        await self.health_round()
        self._tasks = [asyncio.create_task(self._every(self.health_interval_s, self.health_round)),
                       asyncio.create_task(self._every(self.load_interval_s, self.load_round))]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for role in ALL_ROLES:
            for state in self.instances[role].values():
                await state.channel.close()

    @staticmethod
    async def _every(seconds: float, fn: Callable) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await fn()
            except Exception:  # one bad round must not end the loop
                log.exception("router round %s failed", fn.__name__)

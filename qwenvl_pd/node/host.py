"""What both node servers share: the engine thread bridged to asyncio, and the gRPC server with
the standard health service."""
import asyncio
import logging
import signal
import time
from concurrent.futures import Future
from typing import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from qwenvl_pd.engine.commands import Command, StepResult
from qwenvl_pd.engine.loop import EngineLoop
from qwenvl_pd.protos.auth import ServerAuth
from qwenvl_pd.protos.channel import SERVER_OPTIONS
from qwenvl_pd.node.runtime import Runtime

log = logging.getLogger(__name__)
WATCH_S = 0.5  # how often the engine and the ranks are checked
DRAIN_POLL_S = 0.05


class NodeHost:
    """A node's engine thread seen from asyncio: commands go in, step results come out (on_step,
    on the engine thread; post hands them over)."""

    def __init__(self, runtime: Runtime, on_step: Callable[[StepResult], None],
                 in_flight: Callable[[], int] = lambda: 0):
        self.runtime = runtime
        self.aio = asyncio.get_running_loop()
        self.engine_loop = EngineLoop(runtime.engine, on_step)
        self.in_flight = in_flight  # requests (prefill: leases too) a drain must wait for
        self.draining = False

    async def refuse_if_draining(self, context) -> None:
        """New work goes elsewhere once a drain has begun; what is under way finishes here."""
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.runtime.cfg.role} "
                                f"{self.runtime.instance_id} is draining; send new work elsewhere")

    async def call(self, command: Command):
        """Run command on the engine thread and await its result; a caller cancelled before it
        started skips it."""
        return await asyncio.wrap_future(self.engine_loop.submit(command))

    async def settle(self, command: Command):
        """Like call, for clean-up: the command runs even if the awaiting task is cancelled."""
        return await asyncio.shield(asyncio.wrap_future(self.engine_loop.submit(command)))

    def send(self, command: Command) -> Future:
        """Run command on the engine thread; nobody waits for it (a free after a late read)."""
        return self.engine_loop.submit(command)

    def post(self, fn: Callable, *args) -> None:
        """From the engine thread: run fn(*args) on the asyncio loop."""
        self.aio.call_soon_threadsafe(fn, *args)


def run_node(cfg, make_service: Callable, add_to_server: Callable) -> int:
    """Build the runtime for cfg, serve make_service(runtime) until SIGINT/SIGTERM (exit code
    0) or until the engine or a rank fails (1)."""
    runtime = Runtime(cfg)

    def register(server: grpc.aio.Server) -> NodeHost:
        service = make_service(runtime)
        add_to_server(service, server)
        return service.host

    return asyncio.run(serve(runtime, register))


async def serve(runtime: Runtime, register: Callable[[grpc.aio.Server], NodeHost]) -> int:
    """Start the engine and the gRPC server; run until SIGINT/SIGTERM or a failure."""
    secret = runtime.cfg.cluster_secret
    server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=[ServerAuth(secret)] if secret else None,
                             maximum_concurrent_rpcs=runtime.cfg.max_concurrent_rpcs)
    host = register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.add_insecure_port(f"{runtime.cfg.bind}:{runtime.cfg.port}")
    host.engine_loop.start()
    await server.start()
    await _set_serving(health_servicer)
    log.info("%s %s serving on %s:%d", runtime.cfg.role, runtime.instance_id, runtime.cfg.bind,
             runtime.cfg.port)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    failed = await _until_stopped(stop, host, runtime, health_servicer)
    if not failed:  # a signal: the proxy stops routing here while running streams finish
        await health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await drain(host, runtime.cfg.drain_seconds)
    # after a failure in-flight streams end with an RPC error now, not when their deadline passes
    await server.stop(grace=0.5)
    host.engine_loop.stop()
    runtime.close(failed)
    return 1 if failed else 0


async def drain(host: NodeHost, seconds: float) -> None:
    """Refuse new work, keep serving what is under way (prefill: the KV reads, Release and WatchKV
    of every lease) until none is left or `seconds` pass: closing the transfer engine under a
    lease would fail a decode that is still reading it."""
    host.draining = True
    deadline = time.monotonic() + seconds
    log.info("draining: %d in flight, waiting up to %.0f s", host.in_flight(), seconds)
    while host.in_flight() and time.monotonic() < deadline:
        await asyncio.sleep(DRAIN_POLL_S)
    log.info("drained (%d left in flight)", host.in_flight())


async def _until_stopped(stop: asyncio.Event, host: NodeHost, runtime: Runtime, health_servicer) -> bool:
    """Wait for a signal (-> False) or a failure of the engine or a rank (-> True)."""
    while not stop.is_set():
        reason = host.engine_loop.failure or runtime.failure()
        if reason:
            log.error("%s %s cannot serve: %s; exiting", runtime.cfg.role, runtime.instance_id, reason)
            await health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            return True
        try:
            await asyncio.wait_for(stop.wait(), WATCH_S)
        except asyncio.TimeoutError:
            pass
    return False


async def _set_serving(servicer) -> None:
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)

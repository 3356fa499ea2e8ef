"""The encode node's process: gRPC server with health and the cluster-secret check, until
SIGINT/SIGTERM; then NOT_SERVING and a drain that waits for live leases, as the other roles."""
from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from qwenvl_pd.encode_node.config import EncodeConfig
from qwenvl_pd.encode_node.runtime import EncodeRuntime
from qwenvl_pd.encode_node.service import EncodeService
from qwenvl_pd.node.host import drain
from qwenvl_pd.protos import qwenvl_pd_pb2_grpc as pb_grpc
from qwenvl_pd.protos.auth import ServerAuth
from qwenvl_pd.protos.channel import SERVER_OPTIONS

log = logging.getLogger(__name__)


def main(cfg: EncodeConfig) -> int:
    runtime = EncodeRuntime(cfg)
    try:
        return asyncio.run(serve(runtime))
    finally:
        runtime.close()


async def serve(runtime: EncodeRuntime) -> int:
    cfg = runtime.cfg
    server = grpc.aio.server(options=SERVER_OPTIONS, maximum_concurrent_rpcs=cfg.max_concurrent_rpcs,
                             interceptors=[ServerAuth(cfg.cluster_secret)] if cfg.cluster_secret else None)
    service = EncodeService(runtime)
    pb_grpc.add_EncodeServicer_to_server(service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.add_insecure_port(f"{cfg.bind}:{cfg.port}")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    log.info("encode %s serving on %s:%d", runtime.instance_id, cfg.bind, cfg.port)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    # the proxy stops routing here; prefills finish reading what they hold leases on
    await health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    await drain(service, cfg.drain_seconds)
    service.close()
    await server.stop(grace=0.5)
    return 0

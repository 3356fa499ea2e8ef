"""`qwenvl-pd proxy`: open the backend (PD instances and optional encoders, static or discovered by DNS; or the one
colocated engine the CLI hands in), fetch the model's info, serve the app with uvicorn."""
from __future__ import annotations

import logging

from qwenvl_pd.proxy.http.app import create_app
from qwenvl_pd.proxy.cluster.backend import PDBackend
from qwenvl_pd.messages import ALL_ROLES
from qwenvl_pd.proxy.config import ProxyConfig
from qwenvl_pd.proxy.cluster.discovery import DnsDiscovery, parse_discover_dns
from qwenvl_pd.proxy.metrics import ProxyMetrics
from qwenvl_pd.proxy.prompt.model_info import fetch_model_info
from qwenvl_pd.proxy.cluster.router import Router

log = logging.getLogger(__name__)


async def _discovery(cfg: ProxyConfig, router: Router) -> DnsDiscovery:
    from qwenvl_pd.proxy.cluster.discovery import grpc_health_check
    static = {role: getattr(cfg, role) for role in ALL_ROLES}

    def on_change(role: str, endpoints) -> None:
        # discovered instances passed a health check just now; static ones stay listed
        found = {e.target for e in endpoints}
        log.info("discovered %s instances: %s", role, ", ".join(sorted(found)) or "none")
        router.set_members(role, found | set(static[role]), healthy=True)

    disc = DnsDiscovery(parse_discover_dns(cfg.discover_dns), health_check=grpc_health_check,
                        on_change=on_change, interval=cfg.discovery_interval_s)
    await disc.start()
    return disc


async def open_pd(cfg: ProxyConfig, metrics: ProxyMetrics):
    router = Router(metrics, cfg.prefill_load_cap, cfg.health_interval_s, cfg.load_interval_s,
                    secret=cfg.cluster_secret)
    for role in ALL_ROLES:
        router.set_members(role, getattr(cfg, role))
    disc = await _discovery(cfg, router) if cfg.discover_dns else None
    await router.start()
    try:
        info = await fetch_model_info(lambda: list(router.instances["prefill"]), cfg.model_info_timeout_s,
                                      cfg.cluster_secret)
    except BaseException:
        await _close(router, disc)
        raise

    async def close() -> None:
        await _close(router, disc)
    backend = PDBackend(router, cfg.prefill_timeout_s, cfg.token_timeout_s, cfg.kv_transfer_mode == "layerwise",
                        cfg.encode_timeout_s)
    return backend, info, close


async def _close(router: Router, disc: DnsDiscovery | None) -> None:
    if disc is not None:
        await disc.stop()
    await router.stop()


def main(cfg: ProxyConfig, open_backend=None) -> None:
    """open_backend: the CLI passes the colocated engine's (node/colocated.py) for
    `serve --colocated`; the proxy itself never imports the engine."""
    import uvicorn
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # one process, one event loop: the proxy's work is I/O and small CPU bursts
    uvicorn.run(create_app(cfg, open_backend or open_pd), host=cfg.host, port=cfg.port, log_level="info",
                timeout_graceful_shutdown=5)

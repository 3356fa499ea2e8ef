"""The FastAPI application: error handlers and the lifespan that opens the backend.

Every error leaves as OpenAI's body ({"error": {...}}); validation failures are 400, never
FastAPI's 422. Shared state, authentication and admission live in state.py, the routes in
routes.py and generate_api.py, the request pipeline in prompt/inputs.py / request_run.py / streaming.py,
and building the PD backend in server.py (what a backend must do: cluster/interface.py).
"""
from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from starlette.exceptions import HTTPException as StarletteHTTPException

from qwenvl_pd import __version__
from qwenvl_pd.proxy.config import ProxyConfig
from qwenvl_pd.proxy.errors import APIError, bad_request
from qwenvl_pd.proxy.http.generate_api import router as generate_api
from qwenvl_pd.proxy.cluster.interface import OpenBackend
from qwenvl_pd.proxy.metrics import ProxyMetrics
from qwenvl_pd.proxy.prompt.model_info import build_model
from qwenvl_pd.proxy.http.request_models import component_schemas
from qwenvl_pd.proxy.http.routes import router as routes
from qwenvl_pd.proxy.http.tokenize_api import router as tokenize_api
from qwenvl_pd.proxy.http.state import Proxy
from qwenvl_pd.proxy.http.streaming import error_response

log = logging.getLogger(__name__)


def _install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api(request: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or None
        return error_response(bad_request(first.get("msg", "invalid request"), param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response(APIError(exc.status_code, str(exc.detail), kind))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error"))


def _install_openapi(app: FastAPI) -> None:
    # the routes read their bodies themselves (protocol.py's 400s), so FastAPI cannot see the
    # request models: each route names its model in openapi_extra, and the models join here
    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schema.setdefault("components", {}).setdefault("schemas", {}).update(component_schemas())
            app.openapi_schema = schema
        return app.openapi_schema
    app.openapi = openapi


def create_app(cfg: ProxyConfig, open_backend: OpenBackend) -> FastAPI:
    """The app; its lifespan opens the backend and fetches the model's info before serving."""
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        metrics = ProxyMetrics()
        backend, info, close = await open_backend(cfg, metrics)
        try:
            model = build_model(info, cfg.served_model_name)
            app.state.proxy = Proxy(cfg, model, backend, metrics)
            log.info("serving %s (%s, max_model_len %d) on http://%s:%d/v1", model.name, model.family,
                     model.max_model_len, cfg.host, cfg.port)
            yield
        finally:
            await close()

    app = FastAPI(title="qwenvl-pd", version=__version__, lifespan=lifespan, redoc_url=None)
    _install_handlers(app)
    _install_openapi(app)
    app.include_router(routes)
    app.include_router(generate_api)
    app.include_router(tokenize_api)
    return app

"""The HTTP endpoints: OpenAI's /v1 API plus /health, /metrics and /version."""
from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from qwenvl_pd import __version__
from qwenvl_pd.proxy.http.state import Proxy, Slot, accept, proxy_of
from qwenvl_pd.proxy.http.request_run import RequestRun
from qwenvl_pd.proxy.prompt.inputs import PreparedPrompt, prepare_chat, prepare_completion
from qwenvl_pd.proxy.metrics import CONTENT_TYPE
from qwenvl_pd.proxy.protocol import parse_chat_request, parse_completion_request
from qwenvl_pd.proxy.http.request_models import ChatCompletionRequest, CompletionRequest, request_body
from qwenvl_pd.proxy.responses import model_list, new_id
from qwenvl_pd.proxy.tools import Tools
from qwenvl_pd.proxy.http.streaming import answer_unless_disconnected, collect, stream

router = APIRouter()


async def _respond(request: Request, p: Proxy, slot: Slot, prompt: PreparedPrompt, chat: bool,
                   streaming: bool, include_usage: bool, want_logprobs: bool, arrived: float,
                   tools: Tools = Tools(), echo: str = "", echo_logprobs: bool = False):
    rid = new_id("chatcmpl" if chat else "cmpl")
    run = RequestRun(rid, prompt, p.model, p.backend, p.metrics, want_logprobs, p.cfg.affinity_tokens,
                     arrived, tools, echo, echo_logprobs)
    if streaming:
        # from here on the stream owns the slot and releases it when it ends
        return await stream(run, rid, p.model.name, chat, include_usage, on_close=slot.release)
    try:
        return await answer_unless_disconnected(request, collect(run, rid, p.model.name, chat))
    finally:
        slot.release()


@router.post("/v1/chat/completions", openapi_extra=request_body(ChatCompletionRequest))
async def chat_completions(request: Request):
    arrived = time.perf_counter()
    p, req = await accept(request, parse_chat_request)
    slot, prompt = await p.admit_and_prepare(lambda: prepare_chat(req, p.model, p.cfg), req.n)
    return await _respond(request, p, slot, prompt, True, req.stream, req.include_usage, req.logprobs,
                          arrived, req.tools)


@router.post("/v1/completions", openapi_extra=request_body(CompletionRequest))
async def completions(request: Request):
    arrived = time.perf_counter()
    p, req = await accept(request, parse_completion_request)
    slot, prompt = await p.admit_and_prepare(lambda: prepare_completion(req, p.model), req.n)
    echo = "" if not req.echo else req.prompt if isinstance(req.prompt, str) \
        else p.model.tokenizer.decode(list(req.prompt))
    want = req.logprobs is not None
    return await _respond(request, p, slot, prompt, False, req.stream, req.include_usage, want,
                          arrived, echo=echo, echo_logprobs=req.echo and want)


@router.get("/v1/models")
async def models(request: Request):
    p = proxy_of(request)
    p.authorize(request)
    return model_list([p.model.name], p.model.max_model_len)


@router.get("/health")
async def health(request: Request):
    ready = proxy_of(request).backend.ready()
    return JSONResponse({"status": "ok" if ready else "no healthy prefill or decode instance"},
                        status_code=200 if ready else 503)


@router.get("/live")
async def live():
    """Liveness: the process answers. /health is readiness: 503 while the backends are down, so a
    liveness probe on it would restart every proxy during an outage."""
    return {"status": "alive"}


@router.get("/metrics")
async def metrics(request: Request):
    return PlainTextResponse(proxy_of(request).metrics.render(), media_type=CONTENT_TYPE)


@router.get("/version")
async def version():
    return {"version": __version__}

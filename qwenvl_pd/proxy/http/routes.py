"""The HTTP endpoints: OpenAI's /v1 API plus /health, /metrics and /version."""
from __future__ import annotations

import dataclasses
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from qwenvl_pd import __version__
from qwenvl_pd.proxy.http.state import Proxy, Slot, accept, proxy_of
from qwenvl_pd.proxy.http.batch_run import BatchRun
from qwenvl_pd.proxy.http.request_run import RequestRun
from qwenvl_pd.proxy.prompt.inputs import PreparedPrompt, prepare_chat, prepare_completion
from qwenvl_pd.proxy.metrics import CONTENT_TYPE
from qwenvl_pd.proxy.protocol import parse_chat_request, parse_completion_request
from qwenvl_pd.proxy.http.request_models import ChatCompletionRequest, CompletionRequest, request_body
from qwenvl_pd.proxy.responses import model_list, new_id
from qwenvl_pd.proxy.tools import Tools
from qwenvl_pd.proxy.http.streaming import answer_unless_disconnected, collect, stream

router = APIRouter()


def _get_and_head(path: str):
    """GET, and HEAD for probes and clients that check a URL first (kept out of the schema)."""
    def register(endpoint):
        router.add_api_route(path, endpoint, methods=["HEAD"], include_in_schema=False)
        return router.get(path)(endpoint)
    return register


def _run(p: Proxy, rid: str, prompt: PreparedPrompt, want_logprobs: bool, arrived: float,
         tools: Tools = Tools(), echo: str = "", echo_logprobs: bool = False) -> RequestRun:
    return RequestRun(rid, prompt, p.model, p.backend, p.metrics, want_logprobs, p.cfg.affinity_tokens,
                      arrived, tools, echo, echo_logprobs)


async def _respond(request: Request, p: Proxy, slot: Slot, run, rid: str, chat: bool, req):
    if req.stream:
        # from here on the stream owns the slot and releases it when it ends
        return await stream(run, rid, p.model.name, chat, req.include_usage, on_close=slot.release,
                            continuous_usage=req.continuous_usage)
    try:
        return await answer_unless_disconnected(request, collect(run, rid, p.model.name, chat))
    finally:
        slot.release()


@router.post("/v1/chat/completions", openapi_extra=request_body(ChatCompletionRequest))
async def chat_completions(request: Request):
    arrived = time.perf_counter()
    p, req = await accept(request, parse_chat_request)
    slot, prompt = await p.admit_and_prepare(lambda: prepare_chat(req, p.model, p.cfg), req.n)
    rid = new_id("chatcmpl")
    run = _run(p, rid, prompt, req.logprobs, arrived, req.tools)
    return await _respond(request, p, slot, run, rid, True, req)


@router.post("/v1/completions", openapi_extra=request_body(CompletionRequest))
async def completions(request: Request):
    """One prompt or a batch of them (OpenAI's and vLLM's list of prompts): one run each."""
    arrived = time.perf_counter()
    p, req = await accept(request, parse_completion_request)
    prompts = req.prompts

    async def prepare():
        return [await prepare_completion(dataclasses.replace(req, prompt=one), p.model) for one in prompts]
    slot, prepared = await p.admit_and_prepare(prepare, req.n * len(prompts))
    rid, want = new_id("cmpl"), req.logprobs is not None
    runs = [_run(p, rid if len(prompts) == 1 else f"{rid}-{k}", prepared[k], want, arrived,
                 echo=_echo(p, req, one), echo_logprobs=req.echo and want) for k, one in enumerate(prompts)]
    return await _respond(request, p, slot, runs[0] if len(runs) == 1 else BatchRun(runs), rid, False, req)


def _echo(p: Proxy, req, prompt) -> str:
    if not req.echo:
        return ""
    return prompt if isinstance(prompt, str) else p.model.tokenizer.decode(list(prompt))


@_get_and_head("/v1/models")
async def models(request: Request):
    p = proxy_of(request)
    p.authorize(request)
    return model_list([p.model.name], p.model.max_model_len)


@_get_and_head("/v1/models/{model_id:path}")
async def model(request: Request, model_id: str):
    """OpenAI's retrieve: the served model under its name or an alias; 404 for any other."""
    p = proxy_of(request)
    p.authorize(request)
    p.check_model(model_id)
    return model_list([model_id], p.model.max_model_len)["data"][0]


@_get_and_head("/health")
async def health(request: Request):
    ready = proxy_of(request).backend.ready()
    return JSONResponse({"status": "ok" if ready else "no healthy prefill or decode instance"},
                        status_code=200 if ready else 503)


@_get_and_head("/live")
async def live():
    """Liveness: the process answers. /health is readiness: 503 while the backends are down, so a
    liveness probe on it would restart every proxy during an outage."""
    return {"status": "alive"}


@_get_and_head("/metrics")
async def metrics(request: Request):
    return PlainTextResponse(proxy_of(request).metrics.render(), media_type=CONTENT_TYPE)


@_get_and_head("/version")
async def version():
    return {"version": __version__}

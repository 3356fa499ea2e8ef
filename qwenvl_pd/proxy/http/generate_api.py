"""POST /generate as MindIE serves it for vLLM clients (vLLM 0.2.6's API).

`prompt` is a string (sent as is, no chat template) or, for a multimodal model, a list of
content parts (`text`, `image_url`, `video_url`; a URL may be a bare string) that becomes one user
turn through the chat template. The answer is `{"text": [one string per sample]}`; a string
prompt is repeated in front of each output, as vLLM 0.2.6 does. With `"stream": true` every
update is that same object with the text so far, followed by a NUL byte.
"""
from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from qwenvl_pd.proxy.http.state import accept
from qwenvl_pd.proxy.errors import APIError, bad_request
from qwenvl_pd.proxy.http.request_run import RequestRun
from qwenvl_pd.proxy.prompt.inputs import prepare_chat, prepare_completion
from qwenvl_pd.proxy.protocol import (ChatMessage, ChatRequest, CompletionRequest, parse_parts,
                                      refuse_unsupported, request_common, require_object)
from qwenvl_pd.proxy.http.request_models import GenerateRequest, request_body
from qwenvl_pd.proxy.responses import new_id
from qwenvl_pd.proxy.http.streaming import answer_unless_disconnected, first_delta
from qwenvl_pd.proxy.vllm_fields import GENERATE_REFUSED

router = APIRouter()


def parse_generate_request(body) -> ChatRequest | CompletionRequest:
    """A decoded /generate body -> the chat (list prompt) or completion (string prompt) request."""
    body = require_object(body)
    refuse_unsupported(body, GENERATE_REFUSED)
    common = request_common(body, max_default=None, logprobs=None)
    prompt = body.get("prompt")
    if isinstance(prompt, str) and prompt:
        return CompletionRequest(**common, prompt=prompt)
    if isinstance(prompt, list) and prompt:
        return ChatRequest(**common, messages=(ChatMessage("user", parse_parts(prompt, "prompt")),),
                           prompt_field="prompt", part_path="prompt[{part}]")
    raise bad_request("'prompt' must be a non-empty string, or a non-empty list of content parts",
                      "prompt")


@router.post("/generate", openapi_extra=request_body(GenerateRequest))
async def generate(request: Request):
    arrived = time.perf_counter()
    p, req = await accept(request, parse_generate_request)

    async def prepare():  # -> (prompt, text repeated before each output)
        if isinstance(req, ChatRequest):
            return await prepare_chat(req, p.model, p.cfg), ""
        return await prepare_completion(req, p.model), req.prompt

    slot, (prompt, head) = await p.admit_and_prepare(prepare, req.n)
    run = RequestRun(new_id("cmpl"), prompt, p.model, p.backend, p.metrics, False,
                     p.cfg.affinity_tokens, arrived)
    if req.stream:
        return await _stream(run, head, on_close=slot.release)
    try:
        return await answer_unless_disconnected(request, _collect(run, head))
    finally:
        slot.release()


async def _collect(run: RequestRun, head: str) -> dict:
    texts = [head] * run.prompt.sampling.n
    async for d in run.deltas():
        texts[d.index] += d.text
    return {"text": texts}


async def _stream(run: RequestRun, head: str, on_close) -> StreamingResponse | JSONResponse:
    texts = [head] * run.prompt.sampling.n
    deltas = run.deltas()
    # the first update decides the status: a late refusal still gets its own code
    first, refused = await first_delta(deltas, on_close)
    if refused is not None:
        return refused

    async def body() -> AsyncIterator[bytes]:
        try:
            d = first
            while d is not None:
                texts[d.index] += d.text
                yield (json.dumps({"text": texts}, ensure_ascii=False) + "\0").encode()
                d = await anext(deltas, None)
        except APIError as e:
            yield (json.dumps(e.body(), ensure_ascii=False) + "\0").encode()
        finally:
            on_close()
            await deltas.aclose()

    return StreamingResponse(body(), media_type="application/json")

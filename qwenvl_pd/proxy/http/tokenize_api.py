"""vLLM's POST /tokenize and /detokenize: the proxy's own tokenizer, no instance involved.

/tokenize takes a completion body (`prompt`) or a chat body (`messages`, rendered through the chat
template, images and videos expanded to their placeholders exactly as a request's prompt is);
it answers {"count", "max_model_len", "tokens", "token_strs"}. /detokenize takes {"tokens"} and
answers {"prompt": the text}.
"""
from __future__ import annotations

from dataclasses import dataclass

from fastapi import APIRouter, Request

from qwenvl_pd.proxy.errors import bad_request
from qwenvl_pd.proxy.http.state import Proxy, accept
from qwenvl_pd.proxy.prompt.inputs import prepare_chat
from qwenvl_pd.proxy.prompt.workers import off_loop
from qwenvl_pd.proxy.protocol import ChatRequest, parse_chat_request, typed, require_object

router = APIRouter()


@dataclass(frozen=True)
class _Tokenize:
    model: str | None
    chat: ChatRequest | None  # messages were sent
    prompt: str
    strs: bool  # return_token_strs
    cache_salt: str = ""


def _parse_tokenize(body) -> _Tokenize:
    body = require_object(body)
    chat = parse_chat_request(body) if "messages" in body else None
    prompt = body.get("prompt")
    if chat is None and not isinstance(prompt, str):
        raise bad_request("/tokenize needs 'prompt' (a string) or 'messages'", "prompt")
    model = chat.model if chat else typed(body, "model", (str,), "a string")
    return _Tokenize(model, chat, prompt or "", body.get("return_token_strs") is True)


async def _ids(p: Proxy, req: _Tokenize) -> list[int]:
    if req.chat is None:
        return await off_loop(p.model.encode, req.prompt)
    slot, prompt = await p.admit_and_prepare(lambda: prepare_chat(req.chat, p.model, p.cfg))
    slot.release()
    return list(prompt.token_ids)


@router.post("/tokenize")
async def tokenize(request: Request):
    p, req = await accept(request, _parse_tokenize)
    ids = await _ids(p, req)
    strs = p.model.tokenizer.convert_ids_to_tokens(ids) if req.strs else None
    return {"count": len(ids), "max_model_len": p.model.max_model_len, "tokens": ids, "token_strs": strs}


@dataclass(frozen=True)
class _Detokenize:
    model: str | None
    tokens: list[int]
    cache_salt: str = ""


def _parse_detokenize(body) -> _Detokenize:
    body = require_object(body)
    tokens = body.get("tokens")
    ok = isinstance(tokens, list) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                          for t in tokens)
    if not ok:
        raise bad_request("'tokens' must be a list of non-negative token ids", "tokens")
    return _Detokenize(typed(body, "model", (str,), "a string"), tokens)


@router.post("/detokenize")
async def detokenize(request: Request):
    p, req = await accept(request, _parse_detokenize)
    vocab = len(p.model.tokenizer)
    bad = [t for t in req.tokens if t >= vocab]
    if bad:
        raise bad_request(f"token id {bad[0]} is outside the vocabulary (size {vocab})", "tokens")
    return {"prompt": await off_loop(p.model.tokenizer.decode, req.tokens)}

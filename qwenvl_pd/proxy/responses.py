"""OpenAI protocol, responses: results -> response dicts, SSE chunks, usage and logprobs."""
from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from qwenvl_pd.proxy.errors import APIError

@dataclass(frozen=True)
class TopLogprob:
    token: str
    logprob: float
    bytes: tuple[int, ...] = ()


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float | None  # None: an echoed prompt's first token, which nothing scores
    bytes: tuple[int, ...] = ()
    top: tuple[TopLogprob, ...] | None = ()


@dataclass(frozen=True)
class RankedLogprob:
    """One entry of vLLM's prompt_logprobs: a token id's logprob, rank (1 = best) and text."""
    token_id: int
    logprob: float
    rank: int
    decoded_token: str


# vLLM's prompt_logprobs: None for the first prompt token, then per token its own entry first
# and the top ones after
PromptLogprobList = tuple[tuple[RankedLogprob, ...] | None, ...]


@dataclass(frozen=True)
class Choice:
    index: int
    text: str
    finish_reason: str | None
    logprobs: tuple[TokenLogprob, ...] | None = None
    tool_calls: tuple = ()  # tools.ToolCall; then text is the content before them (may be "")
    prompt_logprobs: PromptLogprobList | None = None  # completions: when asked for

    def message(self) -> dict[str, Any]:
        if not self.tool_calls:
            return {"role": "assistant", "content": self.text}
        return {"role": "assistant", "content": self.text or None,
                "tool_calls": [c.openai() for c in self.tool_calls]}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _lp(x: float) -> float:
    # JSON has no -inf; vLLM reports such tokens with this floor as well
    return max(x, -9999.0) if math.isfinite(x) else -9999.0


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def chat_logprobs(entries: Sequence[TokenLogprob]) -> dict[str, Any]:
    def one(e: TopLogprob | TokenLogprob) -> dict[str, Any]:
        return {"token": e.token, "logprob": _lp(e.logprob), "bytes": list(e.bytes)}
    return {"content": [{**one(e), "top_logprobs": [one(t) for t in e.top]} for e in entries]}


def completion_logprobs(entries: Sequence[TokenLogprob], text_offset: int = 0) -> dict[str, Any]:
    """The legacy API's shape. Each top_logprobs dict holds the token itself too (OpenAI: "up to
    logprobs + 1 elements"), as vLLM's does; an echoed prompt's first token has nulls."""
    offsets = []
    for e in entries:
        offsets.append(text_offset)
        text_offset += len(e.token)
    return {"tokens": [e.token for e in entries],
            "token_logprobs": [None if e.logprob is None else _lp(e.logprob) for e in entries],
            "top_logprobs": [None if e.top is None else _top(e) for e in entries],
            "text_offset": offsets}


def _top(e: TokenLogprob) -> dict[str, float]:
    return {e.token: _lp(e.logprob)} | {t.token: _lp(t.logprob) for t in e.top}


def prompt_logprobs_json(entries: PromptLogprobList) -> list[dict[str, dict] | None]:
    """vLLM's prompt_logprobs: [null, {"<id>": {"logprob", "rank", "decoded_token"}, ...}, ...]."""
    return [None if p is None else {str(e.token_id): {"logprob": _lp(e.logprob), "rank": e.rank,
                                                      "decoded_token": e.decoded_token} for e in p}
            for p in entries]


def chat_completion(rid: str, model: str, choices: Sequence[Choice], usage_: dict,
                    created: int | None = None) -> dict[str, Any]:
    """vLLM puts chat's prompt_logprobs on the response (the samples share the prompt)."""
    out = {"id": rid, "object": "chat.completion", "created": created or int(time.time()),
           "model": model, "usage": usage_, "choices": [
               {"index": c.index, "message": c.message(),
                "logprobs": None if c.logprobs is None else chat_logprobs(c.logprobs),
                "finish_reason": c.finish_reason} for c in choices]}
    if choices and choices[0].prompt_logprobs is not None:
        out["prompt_logprobs"] = prompt_logprobs_json(choices[0].prompt_logprobs)
    return out


def completion(rid: str, model: str, choices: Sequence[Choice], usage_: dict,
               created: int | None = None) -> dict[str, Any]:
    """vLLM puts completions' prompt_logprobs on each choice."""
    return {"id": rid, "object": "text_completion", "created": created or int(time.time()),
            "model": model, "usage": usage_, "choices": [_completion_choice(c) for c in choices]}


def _completion_choice(c: Choice) -> dict[str, Any]:
    out = {"index": c.index, "text": c.text, "finish_reason": c.finish_reason,
           "logprobs": None if c.logprobs is None else completion_logprobs(c.logprobs)}
    if c.prompt_logprobs is not None:
        out["prompt_logprobs"] = prompt_logprobs_json(c.prompt_logprobs)
    return out


@dataclass(frozen=True)
class ChunkBuilder:
    """Streaming chunks of one request: role delta (chat) first, content deltas, one finish
    chunk per choice, then the usage chunk (empty choices) when include_usage is set. With
    usage_now (vLLM's continuous_usage_stats) every chunk carries the usage so far."""
    rid: str
    model: str
    chat: bool
    include_usage: bool = False
    usage_now: Callable[[], dict[str, Any]] | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    def _chunk(self, choices: list[dict]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        out = {"id": self.rid, "object": obj, "created": self.created, "model": self.model,
               "choices": choices}
        if self.include_usage:
            # OpenAI: every chunk but the last carries a null usage
            out["usage"] = None if self.usage_now is None else self.usage_now()
        return out

    def _choice(self, index: int, text: str, finish: str | None,
                logprobs: Sequence[TokenLogprob] | None, role: bool = False) -> dict[str, Any]:
        if not self.chat:
            lp = None if logprobs is None else completion_logprobs(logprobs)
            return {"index": index, "text": text, "logprobs": lp, "finish_reason": finish}
        if role:
            delta = {"role": "assistant", "content": ""}
        else:  # a finish chunk without text carries an empty delta, as OpenAI's does
            delta = {"content": text} if text or not finish else {}
        lp = None if logprobs is None else chat_logprobs(logprobs)
        return {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}

    def chat_delta(self, index: int, delta: dict[str, Any], finish: str | None,
                   logprobs: Sequence[TokenLogprob] | None = None) -> dict[str, Any]:
        """A chat chunk with the delta as given (tool call fragments, content, or nothing)."""
        lp = None if logprobs is None else chat_logprobs(logprobs)
        return self._chunk([{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}])

    def role(self, index: int = 0) -> dict[str, Any]:
        return self._chunk([self._choice(index, "", None, None, role=True)])

    def delta(self, text: str, index: int = 0, logprobs: Sequence[TokenLogprob] | None = None) -> dict:
        return self._chunk([self._choice(index, text, None, logprobs)])

    def finish(self, reason: str, index: int = 0, text: str = "",
               logprobs: Sequence[TokenLogprob] | None = None) -> dict:
        return self._chunk([self._choice(index, text, reason, logprobs)])

    def usage(self, usage_: dict[str, Any]) -> dict[str, Any]:
        return {**self._chunk([]), "usage": usage_}


SSE_DONE = "data: [DONE]\n\n"


def sse(obj: dict[str, Any]) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n\n"


def sse_error(err: APIError) -> str:
    """A mid-stream failure: the status line is already sent, so the error travels as an event."""
    return sse(err.body())


def model_list(names: Sequence[str], max_model_len: int | None = None, owned_by: str = "qwenvl-pd",
               created: int | None = None) -> dict[str, Any]:
    created = created or int(time.time())
    data = [{"id": n, "object": "model", "created": created, "owned_by": owned_by}
            | ({"max_model_len": max_model_len} if max_model_len else {}) for n in names]
    return {"object": "list", "data": data}

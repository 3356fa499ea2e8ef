"""RequestRun deltas -> an OpenAI response: SSE chunks, or one JSON body.

A streaming request waits for its first delta before the status line goes out, so that errors
found that late (prefill rejecting the prompt, no healthy instance) still get their own status
code; anything after that travels as an error event followed by [DONE].
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from qwenvl_pd.proxy.errors import APIError, server_error
from qwenvl_pd.proxy.http.request_run import Delta, RequestRun
from qwenvl_pd.proxy.cluster.racing import unless
from qwenvl_pd.proxy.tool_stream import CallEvent, tool_stream
from qwenvl_pd.proxy.tools import Tools
from qwenvl_pd.proxy.responses import (SSE_DONE, Choice, ChunkBuilder, TokenLogprob, chat_completion,
                                       completion, completion_logprobs, sse, sse_error, usage)

log = logging.getLogger(__name__)


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


async def collect(run: RequestRun, rid: str, model: str, chat: bool) -> dict[str, Any]:
    n = run.n
    texts: list[list[str]] = [[] for _ in range(n)]
    lps: list[list[TokenLogprob] | None] = [None if not run.want_logprobs else [] for _ in range(n)]
    finish: list[str | None] = [None] * n
    prompt: list = [None] * n
    async for d in run.deltas():
        texts[d.index].append(d.text)
        if d.logprobs is not None:
            lps[d.index].extend(d.logprobs)
        finish[d.index] = d.finish_reason or finish[d.index]
        prompt[d.index] = d.prompt_logprobs or prompt[d.index]
    choices = [Choice(i, "".join(texts[i]), finish[i], None if lps[i] is None else tuple(lps[i]),
                      prompt_logprobs=prompt[i]) for i in range(n)]
    if chat:
        choices = [_with_tools(run.tools, c) for c in choices]
    build = chat_completion if chat else completion
    return build(rid, model, choices, run.usage())


def _with_tools(tools: Tools, c: Choice) -> Choice:
    """A chat choice whose text holds tool calls -> content + tool_calls, finish "tool_calls";
    the same machine the stream runs (tool_stream.py), so both give the same message."""
    if tools.mode == "none":
        return c
    ts = tool_stream(tools)
    content, _ = ts.feed(c.text, final=True)
    calls = ts.calls()
    if not calls:
        return c
    reason = "tool_calls" if c.finish_reason == "stop" else c.finish_reason
    return dataclasses.replace(c, text=content, finish_reason=reason, tool_calls=calls)


def _merged(events: list[CallEvent]) -> list[dict]:
    """A call's first event and the fragments after it in one chunk make one entry."""
    out: list[dict] = []
    for e in events:
        if out and e.name is None and out[-1]["index"] == e.index:
            out[-1]["function"]["arguments"] += e.arguments
        else:
            out.append(e.openai())
    return out


class _Sse:
    """Chunks of one request; completions' logprobs carry text offsets that grow per choice.
    With tools, each choice's text runs through a tool stream: content until a call starts,
    then the call's id and name, then its arguments in fragments (vLLM's hermes streaming)."""

    def __init__(self, run: RequestRun, rid: str, model: str, chat: bool, include_usage: bool,
                 continuous_usage: bool = False):
        self.run, self.chat = run, chat
        self.build = ChunkBuilder(rid, model, chat, include_usage, self._usage if continuous_usage else None)
        self.offsets = [0] * run.n
        self.tokens = [0] * run.n  # per choice, as far as the chunks sent tell
        self.streams = [tool_stream(run.tools) for _ in range(run.n)] if chat else []

    def _usage(self) -> dict:
        """The usage as of the chunk being built (the run itself may have counted further)."""
        total = self.run.usage()
        return usage(total["prompt_tokens"], sum(self.tokens),
                     total["prompt_tokens_details"]["cached_tokens"])

    def chunk(self, d: Delta) -> str:
        """The delta's SSE event; "" when it has nothing to say (text held for a tool call)."""
        self.tokens[d.index] = d.tokens
        lp = d.logprobs
        if self.chat and self.run.tools.mode != "none":
            out = self._tool_chunk(d)
            return "" if out is None else sse(out)
        if d.finish_reason:
            out = self.build.finish(d.finish_reason, d.index, d.text, lp)
        else:
            out = self.build.delta(d.text, d.index, lp)
        if lp is not None and not self.chat:
            out["choices"][0]["logprobs"] = completion_logprobs(lp, self.offsets[d.index])
        self.offsets[d.index] += len(d.text)
        return sse(out)

    def _tool_chunk(self, d: Delta) -> dict | None:
        ts, finish = self.streams[d.index], d.finish_reason
        content, events = ts.feed(d.text, final=bool(finish))
        delta = ({"content": content} if content else {}) | (
            {"tool_calls": _merged(events)} if events else {})
        if not (delta or finish or d.logprobs):
            return None
        if finish == "stop" and ts.calls():
            finish = "tool_calls"
        return self.build.chat_delta(d.index, delta, finish or None, d.logprobs)

    def head(self) -> list[str]:
        if not self.chat:
            return []
        return [sse(self.build.role(i)) for i in range(self.run.n)]


async def first_delta(deltas: AsyncIterator[Delta], on_close: Callable[[], None]
                      ) -> tuple[Delta | None, JSONResponse | None]:
    """(the first delta or None when there is none, None), or (None, the error response) when
    the request failed before its first delta; any failure here has already run on_close()."""
    try:
        return await anext(deltas, None), None
    except APIError as e:
        on_close()
        return None, error_response(e)
    except BaseException:
        on_close()
        raise


async def stream(run: RequestRun, rid: str, model: str, chat: bool, include_usage: bool,
                 on_close: Callable[[], None], continuous_usage: bool = False
                 ) -> StreamingResponse | JSONResponse:
    deltas = run.deltas()
    out = _Sse(run, rid, model, chat, include_usage, continuous_usage)
    first, refused = await first_delta(deltas, on_close)
    if refused is not None:
        return refused

    async def body() -> AsyncIterator[str]:
        try:
            for line in out.head():
                yield line
            if first is not None:
                if line := out.chunk(first):
                    yield line
                async for d in deltas:
                    if line := out.chunk(d):
                        yield line
            if include_usage:
                yield sse(out.build.usage(run.usage()))
        except APIError as e:
            yield sse_error(e)
        except Exception as e:  # a bug past the status line: an error event, never a torn stream
            log.exception("stream %s failed after its first chunk", rid)
            yield sse_error(server_error(f"internal error: {type(e).__name__}: {e}"))
        finally:
            on_close()  # first: after a disconnect every further await may be cancelled again
            await deltas.aclose()  # a client that went away cancels every sample's stream
        yield SSE_DONE

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


CLIENT_GONE = 499  # nginx's "client closed request": only the access log and metrics see it


async def answer_unless_disconnected(request: Request, work: Awaitable[Any]) -> Response:
    """`work`'s JSON answer; if the client goes away first, work is cancelled (and so its backend
    streams) and the request ends quietly, not as an ASGI application's traceback."""
    task = await unless(work, until_disconnected(request))
    return Response(status_code=CLIENT_GONE) if task.cancelled() else JSONResponse(task.result())

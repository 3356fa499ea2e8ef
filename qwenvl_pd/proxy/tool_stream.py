"""Tool calls as the text arrives, the way vLLM's hermes parser streams them: content up to the
first `<tool_call>`, then per call one event with its id and name, then its arguments in
fragments as the model writes them; no content once a call has started.

A finished reply runs through the same machine in one piece (streaming.collect), so streamed and
non-streamed replies give the same message. A call's arguments are the model's own JSON text of
the "arguments" value (a string value: the string), so the fragments add up to exactly them.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from qwenvl_pd.proxy.tools import OPEN, ToolCall, Tools, held_back, hermes_call, parse_output

CLOSE = "</tool_call>"
# a call body up to its arguments value: Qwen writes the name first, as Hermes' format has it
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*(?=\S)')
_TAIL = re.compile(r"[\s}]*\Z")  # may be the end of the arguments' and the call's objects
_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class CallEvent:
    index: int
    arguments: str = ""  # the next fragment
    name: str | None = None  # set on a call's first event, with its id
    id: str | None = None

    def openai(self) -> dict:
        if self.name is None:
            return {"index": self.index, "function": {"arguments": self.arguments}}
        return {"index": self.index, "id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolStream:
    """feed(text, final) -> (content, call events); calls() the finished calls."""

    def __init__(self, tools: Tools):
        self.tools, self.events = tools, []
        self.text = ""

    def feed(self, text: str, final: bool = False) -> tuple[str, list[CallEvent]]:
        """Grammar-written calls (named, required) come from the whole text at the end, except a
        named call's arguments, which are the text itself and stream as they come."""
        self.text += text
        out = []
        if self.tools.mode == "named":
            if not self.events:
                out.append(CallEvent(0, "", self.tools.name, new_call_id()))
            out.append(CallEvent(0, text))
        elif final:
            content, calls = parse_output(self.tools, self.text)
            out = [CallEvent(k, c.arguments, c.name, new_call_id()) for k, c in enumerate(calls)]
            if not calls:
                self.events += out
                return content or "", []
        self.events += [e for e in out if e.arguments or e.name is not None]
        return "", [e for e in out if e.arguments or e.name is not None]

    def calls(self) -> tuple[ToolCall, ...]:
        return calls_of(self.events)


def calls_of(events: list[CallEvent]) -> tuple[ToolCall, ...]:
    calls: dict[int, list] = {}
    for e in events:
        if e.name is not None:
            calls[e.index] = [e.name, "", e.id]
        calls[e.index][1] += e.arguments
    return tuple(ToolCall(name, args, cid) for name, args, cid in calls.values())


class HermesStream(ToolStream):
    """tool_choice auto: Qwen's `<tool_call>{"name": ..., "arguments": ...}</tool_call>` text."""

    def __init__(self, tools: Tools):
        super().__init__(tools)
        self.pos = 0  # text[:pos] is dealt with
        self.mode = "content"  # -> "call" -> "between" (after a call: content never again)
        self.count = 0  # calls started
        self.gap = ""  # whitespace held before the current call (content again if it is no call)

    def feed(self, text: str, final: bool = False) -> tuple[str, list[CallEvent]]:
        self.text += text
        content, out = [], []
        while self._step(final, content, out):
            pass
        self.events += out
        return "".join(content), out

    def _step(self, final: bool, content: list, out: list) -> bool:
        """One move of the machine; True while it may move again."""
        if self.mode == "call":
            return self._in_call(final, content, out)
        if self.mode == "done":  # parallel_tool_calls false: the first call is the only one
            self.pos = len(self.text)
            return False
        start = self.text.find(OPEN, self.pos)
        if start < 0:
            end = len(self.text) if final else len(self.text) - held_back(self.text[self.pos:])
            if self.mode == "content":
                piece = self.text[self.pos:end]
                piece = piece if final else piece.rstrip()  # whitespace before a call is no content
                content.append(piece)
                end = self.pos + len(piece)
            self.pos = max(self.pos, end)
            return False
        if self.mode == "content":
            piece = self.text[self.pos:start]
            content.append(piece.rstrip())
            self.gap = piece[len(piece.rstrip()):]
        self._open(start + len(OPEN))
        return True

    def _open(self, body_at: int) -> None:
        self.mode, self.body_at, self.args_at, self.sent = "call", body_at, -1, 0

    def _in_call(self, final: bool, content: list, out: list) -> bool:
        close = self.text.find(CLOSE, self.body_at)
        body = self.text[self.body_at:close if close >= 0 else len(self.text)]
        if self.args_at < 0 and (head := _HEAD.match(body)) is not None:
            self.args_at = head.end()
            out.append(CallEvent(self.count, "", json.loads(f'"{head.group(1)}"'), new_call_id()))
        done = close >= 0 or final
        if self.args_at >= 0:
            self._arguments(body, done, out)
        if not done:
            return False
        self._close(body, close, content, out)
        return close >= 0

    def _arguments(self, body: str, done: bool, out: list) -> None:
        value = self._value(body, done)
        if value is None:
            return
        if value.startswith(body[self.args_at:self.args_at + self.sent]) and len(value) > self.sent:
            out.append(CallEvent(self.count, value[self.sent:]))
            self.sent = len(value)

    def _value(self, body: str, done: bool) -> str | None:
        """The arguments' text known so far: all of it once the JSON value parses whole."""
        at = self.args_at
        try:
            value, end = _DECODER.raw_decode(body, at)
        except ValueError:
            if body[at:at + 1] == '"':  # a string value goes out decoded, whole, at the end
                return None
            tail = body[at:]
            if not done:
                tail = tail[:len(tail) - held_back(tail, CLOSE)]
                return tail[:_TAIL.search(tail).start()]
            tail = tail.rstrip()
            return tail[:-1].rstrip() if tail.endswith("}") else tail
        return value if isinstance(value, str) else body[at:end]

    def _close(self, body: str, close: int, content: list, out: list) -> None:
        end = len(self.text) if close < 0 else close + len(CLOSE)
        called = self.args_at >= 0
        if not called:  # the head never matched: a call in another key order, or no call at all
            whole = hermes_call(body)
            if whole is None and self.count == 0:  # no call yet: the text was content after all
                content.append(self.gap + self.text[self.body_at - len(OPEN):end])
                self.mode, self.pos = "content", end
                return
            if whole is not None:
                out.append(CallEvent(self.count, whole.arguments, whole.name, new_call_id()))
                called = True
        self.count += called
        self.mode, self.pos = ("between" if self.tools.parallel else "done"), end


def tool_stream(tools: Tools) -> ToolStream:
    return HermesStream(tools) if tools.mode == "auto" else ToolStream(tools)

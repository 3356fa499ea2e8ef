"""Tool calling, Qwen's (Hermes) way: `tools` in the prompt, `<tool_call>{json}</tool_call>` in the
output. tool_choice "required" and a named function go through the grammar, as vLLM does it:
the model writes a JSON array of {name, parameters} (required) or the arguments object (named),
so a call is always valid JSON for its schema; "auto" parses the text the model wrote."""
from __future__ import annotations

import dataclasses
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from qwenvl_pd.proxy.errors import bad_request
from qwenvl_pd.sampling_params import StructuredOutputsParams

__all__ = ["Tools", "ToolCall", "parse_tools", "tool_system_prompt", "parse_output", "hermes_call",
           "held_back"]

CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
OPEN = "<tool_call>"
CHOICES = ("none", "auto", "required")
_ANY_OBJECT = {"type": "object"}


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = ""

    def openai(self, index: int | None = None) -> dict[str, Any]:
        out = {"id": self.id or f"call_{uuid.uuid4().hex[:24]}", "type": "function",
               "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


@dataclass(frozen=True)
class Tools:
    functions: tuple[dict, ...] = ()  # OpenAI function objects: name, description, parameters
    choice: str = "auto"              # "none" | "auto" | "required" | "named"
    name: str | None = None           # the named function
    parallel: bool = True             # parallel_tool_calls: false -> at most one call

    @property
    def mode(self) -> str:
        return "none" if not self.functions else self.choice

    def template_tools(self) -> list[dict] | None:
        return [{"type": "function", "function": f} for f in self.functions] or None

    def grammar(self) -> StructuredOutputsParams | None:
        """What "required" and a named choice constrain the output to."""
        if self.mode == "named":
            return StructuredOutputsParams(json=json.dumps(self._params(self.name)))
        if self.mode != "required":
            return None
        one = [{"type": "object", "additionalProperties": False, "required": ["name", "parameters"],
                "properties": {"name": {"const": f["name"]}, "parameters": self._params(f["name"])}}
               for f in self.functions]
        array = {"type": "array", "minItems": 1, "items": {"anyOf": one}}
        return StructuredOutputsParams(json=json.dumps(array | ({} if self.parallel else {"maxItems": 1})))

    def _params(self, name: str) -> dict:
        f = next(f for f in self.functions if f["name"] == name)
        return f.get("parameters") or _ANY_OBJECT


def parse_tools(body: dict) -> Tools:
    """`tools` and `tool_choice`; a 400 naming the field for anything malformed or unknown."""
    raw = body.get("tools")
    if raw is None:
        raw = []
    if not isinstance(raw, list):
        raise bad_request("'tools' must be a list", "tools")
    functions = tuple(_function(t, f"tools[{i}]") for i, t in enumerate(raw))
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise bad_request("'parallel_tool_calls' must be a boolean", "parallel_tool_calls")
    return dataclasses.replace(_choice(body.get("tool_choice"), functions), parallel=parallel)


def _choice(choice: Any, functions: tuple[dict, ...]) -> Tools:
    if choice is None:
        return Tools(functions, "auto")
    if isinstance(choice, str):
        if choice not in CHOICES:
            raise bad_request(f"'tool_choice' must be one of {CHOICES} or a function, got {choice!r}",
                              "tool_choice")
        if choice == "required" and not functions:
            raise bad_request("'tool_choice' is 'required' but no 'tools' are given", "tool_choice")
        return Tools(functions, choice)
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(name, str) or choice.get("type") != "function":
        raise bad_request("'tool_choice' must be a string or {'type': 'function', 'function': "
                          "{'name': ...}}", "tool_choice")
    if name not in {f["name"] for f in functions}:
        raise bad_request(f"'tool_choice' names function {name!r}, which is not in 'tools'",
                          "tool_choice.function.name")
    return Tools(functions, "named", name)


def _function(t: Any, path: str) -> dict:
    f = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
    if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not f["name"]:
        raise bad_request("a tool must be {'type': 'function', 'function': {'name': ..., ...}}", path)
    params = f.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise bad_request("'parameters' must be a JSON schema object", f"{path}.function.parameters")
    return {k: f[k] for k in ("name", "description", "parameters") if f.get(k) is not None}


def tool_system_prompt(functions: tuple[dict, ...]) -> str:
    """Qwen2.5/Qwen3's tool instructions, word for word, for templates that do not render tools."""
    lines = "\n".join(json.dumps({"type": "function", "function": f}, ensure_ascii=False)
                      for f in functions)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
            f"{lines}\n</tools>\n\nFor each function call, return a json object with function name "
            "and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def parse_output(tools: Tools, text: str) -> tuple[str | None, tuple[ToolCall, ...]]:
    """(content, tool calls) of a finished sample's text."""
    if tools.mode == "named":
        return None, (ToolCall(tools.name, text),)
    if tools.mode == "required":
        try:
            calls = json.loads(text)
        except ValueError:  # cut off by max_tokens: nothing to call
            return text, ()
        return None, tuple(ToolCall(c["name"], json.dumps(c["parameters"], ensure_ascii=False))
                           for c in calls)
    if tools.mode != "auto" or OPEN not in text:
        return text, ()
    calls = tuple(c for c in (hermes_call(m) for m in CALL.findall(text)) if c is not None)
    calls = calls if tools.parallel else calls[:1]
    if not calls:
        return text, ()
    content = text[:text.index(OPEN)].strip()
    return content or None, calls


def hermes_call(body: str) -> ToolCall | None:
    """One call's JSON body -> the call; None unless it is {"name": str, "arguments": ...}."""
    try:
        call = json.loads(body)
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    args = call.get("arguments", {})
    return ToolCall(call["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))


def held_back(text: str, token: str = OPEN) -> int:
    """How many trailing characters of streamed text may be the start of `token`."""
    for k in range(min(len(token) - 1, len(text)), 0, -1):
        if token.startswith(text[-k:]):
            return k
    return 0

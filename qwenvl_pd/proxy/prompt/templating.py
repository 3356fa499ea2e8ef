"""Render the checkpoint's chat template for a validated chat request.

The template comes from the prefill's ModelInfo, i.e. from the checkpoint: untrusted code, so it
runs in jinja2's immutable sandbox with the same environment Hugging Face uses (trim/lstrip
blocks, loop controls, a non-escaping tojson, raise_exception, strftime_now) so the prompt is the
one transformers' apply_chat_template would produce. Image and video parts become the
``{"type": "image"}`` / ``{"type": "video"}`` items Qwen templates turn into placeholders.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from qwenvl_pd.proxy.errors import bad_request
from qwenvl_pd.proxy.protocol import ChatMessage, ImagePart, TextPart, VideoPart
from qwenvl_pd.proxy.tools import Tools, tool_system_prompt

__all__ = ["ChatTemplate", "special_tokens_from_config", "template_messages"]

# the named special tokens transformers passes to every template (its special_tokens_map)
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                      "mask_token")


def special_tokens_from_config(tokenizer_config: bytes | str | Mapping[str, Any]) -> dict[str, str]:
    """The named special tokens of a tokenizer_config.json (string or {"content": ...} values)."""
    cfg = tokenizer_config if isinstance(tokenizer_config, Mapping) else json.loads(tokenizer_config)
    out = {}
    for key in SPECIAL_TOKEN_KEYS:
        value = cfg.get(key)
        value = value.get("content") if isinstance(value, Mapping) else value
        if isinstance(value, str):
            out[key] = value
    return out


def _part(p: TextPart | ImagePart | VideoPart) -> dict[str, str]:
    if isinstance(p, ImagePart):
        return {"type": "image"}
    if isinstance(p, VideoPart):
        return {"type": "video"}
    return {"type": "text", "text": p.text}


def template_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """ChatMessages as the plain dicts a chat template iterates over (tool calls with their
    arguments as objects, which is what Qwen's templates and transformers expect)."""
    return [{"role": m.role, "content": m.content if isinstance(m.content, str)
             else [_part(p) for p in m.content]}
            | ({"tool_calls": [{"type": "function", "id": c.id, "function": {
                "name": c.name, "arguments": _arguments(c.arguments)}} for c in m.tool_calls]}
               if m.tool_calls else {})
            | ({"tool_call_id": m.tool_call_id} if m.tool_call_id else {}) for m in messages]


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text  # rendered as sent


def hermes_messages(messages: Sequence[ChatMessage], tools: Tools) -> list[ChatMessage]:
    """For a template that renders no tools: Qwen's tool prompt in the system turn, calls as
    <tool_call> text, tool results as <tool_response> user turns (what Qwen's tool templates
    render)."""
    out = [_hermes_message(m) for m in messages]
    if tools.functions:
        prompt = tool_system_prompt(tools.functions)
        if out and out[0].role == "system" and isinstance(out[0].content, str):
            out[0] = ChatMessage("system", f"{out[0].content}\n\n{prompt}")
        else:
            out.insert(0, ChatMessage("system", prompt))
    return out


def _hermes_message(m: ChatMessage) -> ChatMessage:
    if m.role == "tool":
        text = m.content if isinstance(m.content, str) else "".join(
            p.text for p in m.parts if isinstance(p, TextPart))
        return ChatMessage("user", f"<tool_response>\n{text}\n</tool_response>")
    if m.tool_calls and isinstance(m.content, str):
        calls = "".join(f'\n<tool_call>\n{{"name": {json.dumps(c.name)}, "arguments": {c.arguments}}}'
                        "\n</tool_call>" for c in m.tool_calls)
        return ChatMessage(m.role, (m.content + calls).lstrip("\n"))
    return m


class _Namespace(jinja2.utils.Namespace):
    # namespace() attributes starting with "_" are a known path towards Python internals
    def __init__(*args: Any, **kwargs: Any) -> None:
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


class _Generation(jinja2.ext.Extension):
    """{% generation %}...{% endgeneration %} marks assistant text for training masks; rendering
    just keeps the body."""
    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_keep"), [], [], body).set_lineno(lineno)

    def _keep(self, caller: Any) -> str:
        return caller()


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # jinja's own tojson HTML-escapes, which would change the prompt
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise, namespace=_Namespace,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env


class ChatTemplate:
    """One compiled template; render() is cheap and thread-safe."""

    def __init__(self, source: str, special_tokens: Mapping[str, str] | None = None) -> None:
        try:
            self._template = _environment().from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise ValueError(f"the chat template does not compile: {e}") from None
        self._special = dict(special_tokens or {})
        self.renders_tools = "tools" in source  # Qwen3-VL's and Qwen2.5's do; Qwen2.5-VL's not

    def render(self, messages: Sequence[ChatMessage], add_generation_prompt: bool = True,
               template_kwargs: Mapping[str, Any] | None = None, tools: Tools = Tools()) -> str:
        """The prompt text; template_kwargs (a request's chat_template_kwargs, e.g. add_vision_id)
        become template variables. A template's raise_exception (e.g. roles out of order) is a 400."""
        try:
            # template_kwargs come from the client: they may not replace the conversation itself
            if not self.renders_tools:
                messages = hermes_messages(messages, tools)
            return self._template.render({**self._special, **(template_kwargs or {}),
                                          "tools": tools.template_tools() if self.renders_tools else None,
                                          "documents": None,
                                          "messages": template_messages(messages),
                                          "add_generation_prompt": add_generation_prompt})
        except jinja2.exceptions.SecurityError:
            raise  # the template itself is at fault, not the request: a server error
        except jinja2.exceptions.TemplateError as e:
            raise bad_request(f"the chat template rejected the messages: {e}", "messages") from None

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
    """ChatMessages as the plain dicts a chat template iterates over."""
    return [{"role": m.role, "content": m.content if isinstance(m.content, str)
             else [_part(p) for p in m.content]} for m in messages]


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

    def render(self, messages: Sequence[ChatMessage], add_generation_prompt: bool = True,
               template_kwargs: Mapping[str, Any] | None = None) -> str:
        """The prompt text; template_kwargs (a request's chat_template_kwargs, e.g. add_vision_id)
        become template variables. A template's raise_exception (e.g. roles out of order) is a 400."""
        try:
            # template_kwargs come from the client: they may not replace the conversation itself
            return self._template.render({**self._special, **(template_kwargs or {}), "tools": None,
                                          "documents": None,
                                          "messages": template_messages(messages),
                                          "add_generation_prompt": add_generation_prompt})
        except jinja2.exceptions.SecurityError:
            raise  # the template itself is at fault, not the request: a server error
        except jinja2.exceptions.TemplateError as e:
            raise bad_request(f"the chat template rejected the messages: {e}", "messages") from None

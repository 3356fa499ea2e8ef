"""OpenAI protocol, requests: bodies -> frozen, validated requests (responses.py builds replies).

Validation is hand-written rather than pydantic so that every failure is a 400 whose `param`
names the exact field (``messages[0].content[1].image_url.url``), which is what OpenAI does and
what a client needs to fix its request. Unknown top-level fields are ignored (SDKs send extras);
vLLM's and OpenAI's fields we cannot honour are refused (vllm_fields.py), never silently dropped.
request_models.py mirrors these rules as pydantic models for the OpenAPI schema.
"""

from __future__ import annotations

import dataclasses
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Union

from qwenvl_pd.proxy.errors import bad_request
from qwenvl_pd.proxy.fields import (INT64, LOGIT_BIAS_BOUND, MAX_LOGPROBS, MAX_N, MAX_STOP,  # noqa: F401
                                    MAX_STOP_CHARS, MAX_STOP_TOKEN_IDS, boolean, integer, model_name,
                                    prompt_logprobs_count, read_sampling, stream_flags, refuse_unsupported,
                                    require_object, typed)
from qwenvl_pd.proxy.structured import checked
from qwenvl_pd.proxy.tools import ToolCall, Tools, parse_tools
from qwenvl_pd.proxy.vllm_fields import CHAT_REFUSED, COMPLETION_REFUSED
from qwenvl_pd.sampling_params import SamplingParams

__all__ = ["TextPart", "ImagePart", "VideoPart", "Part", "ChatMessage", "ChatRequest", "CompletionRequest",
           "parse_chat_request", "parse_completion_request", "parse_parts", "refuse_unsupported", "typed",
           "request_common", "require_object"]

ROLES = ("system", "developer", "user", "assistant", "tool")  # developer: OpenAI's new name for system
URL_SCHEMES = ("data", "http", "https", "file")
MAX_PROMPTS = 128  # prompts in one /v1/completions batch; each is n samples of its own


@dataclass(frozen=True)
class TextPart:
    text: str


@dataclass(frozen=True)
class ImagePart:
    url: str
    detail: str | None = None  # accepted for compatibility; Qwen sizes images itself


@dataclass(frozen=True)
class VideoPart:
    url: str


Part = Union[TextPart, ImagePart, VideoPart]


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str | tuple[Part, ...]  # kept as sent: templates may treat the two forms differently
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant turn's calls
    tool_call_id: str | None = None        # a tool result's call

    @property
    def parts(self) -> tuple[Part, ...]:
        return (TextPart(self.content),) if isinstance(self.content, str) else self.content


@dataclass(frozen=True)
class _Common:
    model: str | None  # None when the client sent none: the server's default model
    sampling: SamplingParams
    stream: bool
    include_usage: bool
    cache_salt: str = ""  # vLLM's: prefix-cache hits only among requests of the same salt
    continuous_usage: bool = False  # vLLM's stream_options.continuous_usage_stats: usage on every chunk

    @property
    def n(self) -> int:
        return self.sampling.n

    @property
    def max_tokens(self) -> int | None:  # None: up to the context length
        return self.sampling.max_tokens

    @property
    def stop(self) -> tuple[str, ...]:
        return tuple(self.sampling.stop or ())


@dataclass(frozen=True)
class ChatRequest(_Common):
    messages: tuple[ChatMessage, ...] = ()
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    tools: Tools = Tools()
    # where error params point: /generate sends its parts as the prompt, not as messages
    prompt_field: str = "messages"
    part_path: str = "messages[{message}].content[{part}]"


@dataclass(frozen=True)
class CompletionRequest(_Common):
    prompt: str | tuple[int, ...] = ""  # text, or token ids
    more_prompts: tuple[str | tuple[int, ...], ...] = ()  # a batch's prompts after the first
    logprobs: int | None = None
    echo: bool = False  # the prompt's text (and with logprobs its entries) before each completion's

    @property
    def prompts(self) -> tuple[str | tuple[int, ...], ...]:
        return (self.prompt, *self.more_prompts)


# ---- messages --------------------------------------------------------------------------------

def _url(holder: Any, path: str, key: str) -> str:
    # OpenAI nests the url ({"image_url": {"url": ...}}); a bare string is a common shorthand
    url = holder.get("url") if isinstance(holder, dict) else holder
    if not isinstance(url, str) or not url:
        raise bad_request(f"'{key}.url' must be a non-empty string", f"{path}.{key}.url")
    if url.startswith("/"):  # a server-side path, as MindIE takes it: same guard as file://
        return "file://" + urllib.parse.quote(url)
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme not in URL_SCHEMES:
        raise bad_request(f"unsupported URL scheme {scheme!r}; expected one of {URL_SCHEMES}",
                          f"{path}.{key}.url")
    return url


def _part(p: Any, path: str) -> Part:
    if not isinstance(p, dict):
        raise bad_request("a content part must be an object", path)
    kind = p.get("type")
    if kind == "text":
        return TextPart(typed(p, "text", (str,), "a string", f"{path}.text") or "")
    if kind == "image_url":
        detail = p["image_url"].get("detail") if isinstance(p.get("image_url"), dict) else None
        return ImagePart(_url(p.get("image_url"), path, "image_url"), detail)
    if kind == "video_url":
        return VideoPart(_url(p.get("video_url"), path, "video_url"))
    raise bad_request(f"unknown content part type {kind!r}; expected 'text', 'image_url' or "
                      "'video_url'", f"{path}.type")


def _message(m: Any, path: str) -> ChatMessage:
    if not isinstance(m, dict):
        raise bad_request("a message must be an object", path)
    role = m.get("role")
    if role not in ROLES:
        raise bad_request(f"'role' must be one of {ROLES}, got {role!r}", f"{path}.role")
    role = "system" if role == "developer" else role  # as vLLM and OpenAI treat it
    content = m.get("content")
    if content is None and role == "assistant":
        content = ""  # an assistant turn may carry no text
    extra = dict(tool_calls=_tool_calls(m, path) if role == "assistant" else (),
                 tool_call_id=typed(m, "tool_call_id", (str,), "a string", f"{path}.tool_call_id"))
    if isinstance(content, str):
        return ChatMessage(role, content, **extra)
    if not isinstance(content, list):
        raise bad_request("'content' must be a string or a list of content parts", f"{path}.content")
    return ChatMessage(role, parse_parts(content, f"{path}.content"), **extra)


def _tool_calls(m: dict, path: str) -> tuple[ToolCall, ...]:
    raw = m.get("tool_calls") or []
    if not isinstance(raw, list):
        raise bad_request("'tool_calls' must be a list", f"{path}.tool_calls")
    calls = []
    for j, c in enumerate(raw):
        f = c.get("function") if isinstance(c, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) \
                or not isinstance(f.get("arguments", ""), str):
            raise bad_request("a tool call must be {'id': ..., 'type': 'function', 'function': "
                              "{'name': ..., 'arguments': '<json>'}}", f"{path}.tool_calls[{j}]")
        calls.append(ToolCall(f["name"], f.get("arguments") or "{}", str(c.get("id") or "")))
    return tuple(calls)


def parse_parts(raw: list, path: str) -> tuple[Part, ...]:
    """A list of content parts; errors name `path[j]`."""
    return tuple(_part(p, f"{path}[{j}]") for j, p in enumerate(raw))


def _messages(raw: Any) -> tuple[ChatMessage, ...]:
    if not isinstance(raw, list) or not raw:
        raise bad_request("'messages' must be a non-empty list", "messages")
    return tuple(_message(m, f"messages[{i}]") for i, m in enumerate(raw))


# ---- public parsers --------------------------------------------------------------------------

def request_common(body: dict, max_default: int | None, logprobs: int | None,
                   prompt_logprobs: int | None = None) -> dict[str, Any]:
    """The fields every request type shares, as keyword arguments of its dataclass."""
    stream, include_usage, continuous = stream_flags(body)
    sampling = read_sampling(body, max_default, logprobs, prompt_logprobs)
    return dict(model=model_name(body), sampling=sampling, stream=stream, include_usage=include_usage,
                cache_salt=typed(body, "cache_salt", (str,), "a string") or "",
                continuous_usage=continuous)


def parse_chat_request(body: Any) -> ChatRequest:
    """A decoded JSON body -> ChatRequest. Raises APIError(400) naming the bad field."""
    body = require_object(body)
    refuse_unsupported(body, CHAT_REFUSED)
    messages = _messages(body.get("messages"))
    want = boolean(body, "logprobs", False)
    top = integer(body, "top_logprobs", None, 0, MAX_LOGPROBS)
    if top is not None and not want:
        raise bad_request("'top_logprobs' requires 'logprobs' to be true", "top_logprobs")
    kwargs = typed(body, "chat_template_kwargs", (dict,), "an object") or {}
    common = request_common(body, None, (top or 0) if want else None, prompt_logprobs_count(body))
    tools = parse_tools(body)
    spec = tools.grammar()
    if spec is not None:  # required / a named function: the grammar writes the call
        if common["sampling"].structured_outputs is not None:
            raise bad_request("'tool_choice' and a structured output both constrain the output; "
                              "send one", "tool_choice")
        common["sampling"] = dataclasses.replace(common["sampling"],
                                                 structured_outputs=checked("tools", spec))
    return ChatRequest(**common, messages=messages, logprobs=want, top_logprobs=top,
                       add_generation_prompt=boolean(body, "add_generation_prompt", True),
                       chat_template_kwargs=dict(kwargs), tools=tools)


def _one_prompt(v: Any) -> str | tuple[int, ...] | None:
    if isinstance(v, str) and v:
        return v
    if isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                         for t in v):
        return tuple(v)
    return None


def _prompts(v: Any) -> tuple[str | tuple[int, ...], ...]:
    """One prompt (text or token ids), or a batch: a list of texts or of token id lists."""
    one = _one_prompt(v)
    if one is not None:
        return (one,)
    batch = tuple(_one_prompt(p) for p in v) if isinstance(v, list) and v and not \
        any(isinstance(p, int) for p in v) else (None,)
    if None in batch:
        raise bad_request("'prompt' must be a non-empty string, a non-empty list of token ids, or a "
                          "non-empty list of those", "prompt")
    if len(batch) > MAX_PROMPTS:
        raise bad_request(f"'prompt' has {len(batch)} prompts; at most {MAX_PROMPTS} are allowed",
                          "prompt")
    return batch


def parse_completion_request(body: Any) -> CompletionRequest:
    body = require_object(body)
    refuse_unsupported(body, COMPLETION_REFUSED)
    prompts = _prompts(body.get("prompt"))
    logprobs = integer(body, "logprobs", None, 0, MAX_LOGPROBS)
    echo = boolean(body, "echo", False)
    prompt_logprobs = prompt_logprobs_count(body)
    if prompt_logprobs is None and echo:  # vLLM's rule: the echoed prompt gets logprobs' count
        prompt_logprobs = logprobs
    # 16 is the legacy completions API default; chat has none (the context length bounds it)
    return CompletionRequest(**request_common(body, 16, logprobs, prompt_logprobs), prompt=prompts[0],
                             more_prompts=prompts[1:], logprobs=logprobs, echo=echo)

"""OpenAI protocol, requests: bodies -> frozen, validated requests (responses.py builds replies).

Validation is hand-written rather than pydantic so that every failure is a 400 whose `param`
names the exact field (``messages[0].content[1].image_url.url``), which is what OpenAI does and
what a client needs to fix its request. Unknown top-level fields are ignored (SDKs send extras);
vLLM's and OpenAI's fields we cannot honour are refused (vllm_fields.py), never silently dropped.
request_models.py mirrors these rules as pydantic models for the OpenAPI schema.
"""

from __future__ import annotations

import dataclasses
import math
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Union

from qwenvl_pd.proxy.errors import bad_request
from qwenvl_pd.proxy.structured import checked, parse_structured
from qwenvl_pd.proxy.tools import ToolCall, Tools, parse_tools
from qwenvl_pd.proxy.vllm_fields import CHAT_REFUSED, COMPLETION_REFUSED, is_noop
from qwenvl_pd.sampling_params import SamplingParams

__all__ = ["TextPart", "ImagePart", "VideoPart", "Part", "ChatMessage", "ChatRequest", "CompletionRequest",
           "parse_chat_request", "parse_completion_request", "parse_parts", "refuse_unsupported", "typed",
           "request_common", "require_object"]

ROLES = ("system", "developer", "user", "assistant", "tool")  # developer: OpenAI's new name for system
URL_SCHEMES = ("data", "http", "https", "file")
MAX_N = 128
MAX_STOP = 64
MAX_STOP_CHARS = 1024       # one stop string: each is searched in every new piece of text
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGPROBS = 20  # what the sampler returns; OpenAI's own cap for chat
MAX_PROMPTS = 128  # prompts in one /v1/completions batch; each is n samples of its own
LOGIT_BIAS_BOUND = 100.0  # OpenAI's range; vLLM clamps to it
INT64 = (-(2**63), 2**63 - 1)  # the proto's seed type


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


# ---- field readers: each raises a 400 naming the field -------------------------------------

def typed(body: dict, key: str, kinds: tuple[type, ...], what: str, path: str | None = None) -> Any:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) and bool not in kinds or not isinstance(v, kinds):
        raise bad_request(f"'{key}' must be {what}, got {type(v).__name__}", path or key)
    if isinstance(v, float) and not math.isfinite(v):
        raise bad_request(f"'{key}' must be a finite number, got {v}", path or key)
    return v


def _num(body: dict, key: str, default: float, lo: float, hi: float = math.inf,
         lo_open: bool = False) -> float:
    v = typed(body, key, (int, float), "a number")
    if v is None:
        return default
    if v < lo or (lo_open and v == lo) or v > hi:
        left, right = "(" if lo_open else "[", "]" if hi < math.inf else ")"
        raise bad_request(f"'{key}' must be in {left}{lo}, {hi}{right}, got {v}", key)
    return float(v)


def _int(body: dict, key: str, default: int | None, lo: int, hi: int | None = None) -> int | None:
    v = typed(body, key, (int,), "an integer")
    if v is None:
        return default
    if v < lo or (hi is not None and v > hi):
        raise bad_request(f"'{key}' must be an integer >= {lo}" + (f" and <= {hi}" if hi is not None
                                                                    else "") + f", got {v}", key)
    return v


def _bool(body: dict, key: str, default: bool) -> bool:
    v = typed(body, key, (bool,), "a boolean")
    return default if v is None else v


def _stop(body: dict) -> list[str]:
    v = body.get("stop")
    items = [] if v is None else [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise bad_request("'stop' must be a non-empty string or a list of non-empty strings", "stop")
    if len(items) > MAX_STOP:
        raise bad_request(f"'stop' has {len(items)} strings; at most {MAX_STOP} are allowed", "stop")
    if any(len(s) > MAX_STOP_CHARS for s in items):
        raise bad_request(f"a 'stop' string is longer than {MAX_STOP_CHARS} characters", "stop")
    return items


def _stop_token_ids(body: dict) -> list[int]:
    v = body.get("stop_token_ids")
    ok = v is None or isinstance(v, list) and all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in v)
    if not ok:
        raise bad_request("'stop_token_ids' must be a list of non-negative integers", "stop_token_ids")
    if v and len(v) > MAX_STOP_TOKEN_IDS:
        raise bad_request(f"'stop_token_ids' has {len(v)} ids; at most {MAX_STOP_TOKEN_IDS} are allowed",
                          "stop_token_ids")
    return v or []


def refuse_unsupported(body: dict, names: Sequence[str]) -> None:
    for key in names:
        if not is_noop(key, body.get(key)):
            raise bad_request(f"'{key}' is not supported by this server", key)


def _stream(body: dict) -> tuple[bool, bool, bool]:
    """(stream, include_usage, continuous usage): vLLM's continuous_usage_stats puts the usage so
    far on every chunk, and only with include_usage, as vLLM does."""
    stream = _bool(body, "stream", False)
    opts = body.get("stream_options")
    if opts is None:
        return stream, False, False
    if not isinstance(opts, dict):
        raise bad_request("'stream_options' must be an object", "stream_options")
    if not stream:
        raise bad_request("'stream_options' is only allowed when 'stream' is true", "stream_options")
    usage = bool(typed(opts, "include_usage", (bool,), "a boolean", "stream_options.include_usage"))
    every = bool(typed(opts, "continuous_usage_stats", (bool,), "a boolean",
                        "stream_options.continuous_usage_stats"))
    return stream, usage, usage and every


def _prompt_logprobs(body: dict) -> int | None:
    """vLLM's extra: alternatives per prompt position. Streamed chunks carry none, so with stream
    it is refused (0 is let through and dropped, as vLLM does); -1 asks for the vocabulary."""
    v, stream = body.get("prompt_logprobs"), _bool(body, "stream", False)
    if type(v) is int and v == -1:
        raise bad_request(f"'prompt_logprobs' -1 (the whole vocabulary) is not supported by this "
                          f"server; at most {MAX_LOGPROBS}", "prompt_logprobs")
    n = _int(body, "prompt_logprobs", None, 0, MAX_LOGPROBS)
    if n and stream:
        raise bad_request("'prompt_logprobs' is not available when 'stream' is true", "prompt_logprobs")
    return None if stream else n


def _sampling(body: dict, max_default: int | None, logprobs: int | None,
              prompt_logprobs: int | None) -> SamplingParams:
    # both are validated; max_completion_tokens wins, as in OpenAI's chat API
    legacy = _int(body, "max_tokens", max_default, 1)
    max_tokens = _int(body, "max_completion_tokens", legacy, 1)
    min_tokens = _int(body, "min_tokens", 0, 0, max_tokens)
    top_k = _int(body, "top_k", -1, -1)
    temperature = _num(body, "temperature", 1.0, 0.0)
    if not _bool(body, "do_sample", True):  # MindIE's (and HF's) switch: false means greedy
        temperature = 0.0
    try:
        return SamplingParams(
            n=_int(body, "n", 1, 1, MAX_N), temperature=temperature,
            top_p=_num(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
            top_k=-1 if top_k == 0 else top_k,  # vLLM treats 0 as "off" too
            min_p=_num(body, "min_p", 0.0, 0.0, 1.0), seed=_int(body, "seed", None, *INT64),
            max_tokens=max_tokens, min_tokens=min_tokens, stop=_stop(body),
            stop_token_ids=_stop_token_ids(body), ignore_eos=_bool(body, "ignore_eos", False),
            logprobs=logprobs, prompt_logprobs=prompt_logprobs, repetition_penalty=_num(body, "repetition_penalty", 1.0, 0.0, lo_open=True),
            presence_penalty=_num(body, "presence_penalty", 0.0, -2.0, 2.0),
            frequency_penalty=_num(body, "frequency_penalty", 0.0, -2.0, 2.0),
            skip_special_tokens=_bool(body, "skip_special_tokens", True),
            spaces_between_special_tokens=_bool(body, "spaces_between_special_tokens", True),
            logit_bias=_logit_bias(body),
            structured_outputs=parse_structured(body))
    except ValueError as e:  # a rule SamplingParams has and the readers above lack
        raise bad_request(str(e)) from None


def _logit_bias(body: dict) -> dict[int, float] | None:
    """OpenAI's {"<token id>": bias}; biases clamped to [-100, 100] as vLLM does. Ids past the
    vocabulary are refused once the model is known (prompt/inputs.py)."""
    v = body.get("logit_bias")
    if v is None or v == {}:
        return None
    if not isinstance(v, dict):
        raise bad_request("'logit_bias' must be an object mapping token ids to biases", "logit_bias")
    out = {}
    for key, bias in v.items():
        tid = int(key) if isinstance(key, str) and key.strip().isdigit() else None
        ok = type(bias) in (int, float) and math.isfinite(bias)
        if tid is None or not ok:
            raise bad_request(f"'logit_bias' maps token ids to numbers; got {key!r}: {bias!r}",
                              "logit_bias")
        out[tid] = min(LOGIT_BIAS_BOUND, max(-LOGIT_BIAS_BOUND, float(bias)))
    return out


def _model(body: dict) -> str | None:
    return typed(body, "model", (str,), "a string")


def require_object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    return body


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
    stream, include_usage, continuous = _stream(body)
    sampling = _sampling(body, max_default, logprobs, prompt_logprobs)
    return dict(model=_model(body), sampling=sampling, stream=stream, include_usage=include_usage,
                cache_salt=typed(body, "cache_salt", (str,), "a string") or "",
                continuous_usage=continuous)


def parse_chat_request(body: Any) -> ChatRequest:
    """A decoded JSON body -> ChatRequest. Raises APIError(400) naming the bad field."""
    body = require_object(body)
    refuse_unsupported(body, CHAT_REFUSED)
    messages = _messages(body.get("messages"))
    want = _bool(body, "logprobs", False)
    top = _int(body, "top_logprobs", None, 0, MAX_LOGPROBS)
    if top is not None and not want:
        raise bad_request("'top_logprobs' requires 'logprobs' to be true", "top_logprobs")
    kwargs = typed(body, "chat_template_kwargs", (dict,), "an object") or {}
    common = request_common(body, None, (top or 0) if want else None, _prompt_logprobs(body))
    tools = parse_tools(body)
    spec = tools.grammar()
    if spec is not None:  # required / a named function: the grammar writes the call
        if common["sampling"].structured_outputs is not None:
            raise bad_request("'tool_choice' and a structured output both constrain the output; "
                              "send one", "tool_choice")
        common["sampling"] = dataclasses.replace(common["sampling"],
                                                 structured_outputs=checked("tools", spec))
    return ChatRequest(**common, messages=messages, logprobs=want, top_logprobs=top,
                       add_generation_prompt=_bool(body, "add_generation_prompt", True),
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
    logprobs = _int(body, "logprobs", None, 0, MAX_LOGPROBS)
    echo = _bool(body, "echo", False)
    prompt_logprobs = _prompt_logprobs(body)
    if prompt_logprobs is None and echo:  # vLLM's rule: the echoed prompt gets logprobs' count
        prompt_logprobs = logprobs
    # 16 is the legacy completions API default; chat has none (the context length bounds it)
    return CompletionRequest(**request_common(body, 16, logprobs, prompt_logprobs), prompt=prompts[0],
                             more_prompts=prompts[1:], logprobs=logprobs, echo=echo)

"""The field readers of protocol.py: each reads one field of a request body (or a few that go
together, as the sampling parameters do) and raises a 400 naming the field when it is wrong."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from qwenvl_pd.proxy.errors import bad_request
from qwenvl_pd.proxy.structured import parse_structured
from qwenvl_pd.proxy.vllm_fields import is_noop
from qwenvl_pd.sampling_params import SamplingParams

MAX_N = 128
MAX_STOP = 64
MAX_STOP_CHARS = 1024       # one stop string: each is searched in every new piece of text
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGPROBS = 20  # what the sampler returns; OpenAI's own cap for chat
LOGIT_BIAS_BOUND = 100.0  # OpenAI's range; vLLM clamps to it
INT64 = (-(2**63), 2**63 - 1)  # the proto's seed type


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


def integer(body: dict, key: str, default: int | None, lo: int, hi: int | None = None) -> int | None:
    v = typed(body, key, (int,), "an integer")
    if v is None:
        return default
    if v < lo or (hi is not None and v > hi):
        raise bad_request(f"'{key}' must be an integer >= {lo}" + (f" and <= {hi}" if hi is not None
                                                                    else "") + f", got {v}", key)
    return v


def boolean(body: dict, key: str, default: bool) -> bool:
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


def stream_flags(body: dict) -> tuple[bool, bool, bool]:
    """(stream, include_usage, continuous usage): vLLM's continuous_usage_stats puts the usage so
    far on every chunk, and only with include_usage, as vLLM does."""
    stream = boolean(body, "stream", False)
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


def prompt_logprobs_count(body: dict) -> int | None:
    """vLLM's extra: alternatives per prompt position. Streamed chunks carry none, so with stream
    it is refused (0 is let through and dropped, as vLLM does); -1 asks for the vocabulary."""
    v, stream = body.get("prompt_logprobs"), boolean(body, "stream", False)
    if type(v) is int and v == -1:
        raise bad_request(f"'prompt_logprobs' -1 (the whole vocabulary) is not supported by this "
                          f"server; at most {MAX_LOGPROBS}", "prompt_logprobs")
    n = integer(body, "prompt_logprobs", None, 0, MAX_LOGPROBS)
    if n and stream:
        raise bad_request("'prompt_logprobs' is not available when 'stream' is true", "prompt_logprobs")
    return None if stream else n


def read_sampling(body: dict, max_default: int | None, logprobs: int | None,
              prompt_logprobs: int | None) -> SamplingParams:
    # both are validated; max_completion_tokens wins, as in OpenAI's chat API
    legacy = integer(body, "max_tokens", max_default, 1)
    max_tokens = integer(body, "max_completion_tokens", legacy, 1)
    min_tokens = integer(body, "min_tokens", 0, 0, max_tokens)
    top_k = integer(body, "top_k", -1, -1)
    temperature = _num(body, "temperature", 1.0, 0.0)
    if not boolean(body, "do_sample", True):  # MindIE's (and HF's) switch: false means greedy
        temperature = 0.0
    try:
        return SamplingParams(
            n=integer(body, "n", 1, 1, MAX_N), temperature=temperature,
            top_p=_num(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
            top_k=-1 if top_k == 0 else top_k,  # vLLM treats 0 as "off" too
            min_p=_num(body, "min_p", 0.0, 0.0, 1.0), seed=integer(body, "seed", None, *INT64),
            max_tokens=max_tokens, min_tokens=min_tokens, stop=_stop(body),
            stop_token_ids=_stop_token_ids(body), ignore_eos=boolean(body, "ignore_eos", False),
            logprobs=logprobs, prompt_logprobs=prompt_logprobs, repetition_penalty=_num(body, "repetition_penalty", 1.0, 0.0, lo_open=True),
            presence_penalty=_num(body, "presence_penalty", 0.0, -2.0, 2.0),
            frequency_penalty=_num(body, "frequency_penalty", 0.0, -2.0, 2.0),
            skip_special_tokens=boolean(body, "skip_special_tokens", True),
            spaces_between_special_tokens=boolean(body, "spaces_between_special_tokens", True),
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


def model_name(body: dict) -> str | None:
    return typed(body, "model", (str,), "a string")


def require_object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    return body

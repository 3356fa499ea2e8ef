"""The request fields vLLM's OpenAI server (and OpenAI) accept that this server does not honour.

Each is refused with a 400 naming it unless its value leaves the output unchanged (None, empty,
or the default that SDKs and benchmarks send). The audit behind these lists is in
docs/ARCHITECTURE.md ("Request fields"); fields that are accepted but change nothing (user,
request_id, add_special_tokens for Qwen's tokenizers, ...) are listed there too.
"""
from __future__ import annotations

from typing import Any

__all__ = ["COMMON_REFUSED", "CHAT_REFUSED", "COMPLETION_REFUSED", "GENERATE_REFUSED", "is_noop"]

# refused on every route
COMMON_REFUSED = (
    "best_of", "use_beam_search", "length_penalty", "include_stop_str_in_output",
    "truncate_prompt_tokens", "truncation_side",
    "allowed_token_ids", "bad_words", "logprob_token_ids", "guided_whitespace_pattern",
    "structural_tag", "priority", "logits_processors", "return_tokens_as_token_ids",
    "return_token_ids", "return_prompt_text", "kv_transfer_params",
    "ec_transfer_params", "vllm_xargs", "repetition_detection", "watermarking",
    "routed_experts_prompt_start", "mm_processor_kwargs", "media_io_kwargs",
)
CHAT_REFUSED = COMMON_REFUSED + (
    "functions", "function_call", "echo", "continue_final_message", "documents", "chat_template",
    "reasoning_effort", "include_reasoning", "thinking_token_budget", "audio", "modalities",
    "prediction", "web_search_options",
)
COMPLETION_REFUSED = COMMON_REFUSED + ("suffix", "prompt_embeds")
GENERATE_REFUSED = COMMON_REFUSED + ("logprobs", "prompt_logprobs", "stream_options", "early_stopping")

# values other than None / empty / False that change nothing: vLLM's defaults
_DEFAULTS: dict[str, tuple[Any, ...]] = {
    "best_of": (1,),  # `vllm bench serve` sends best_of: 1
    "length_penalty": (1, 1.0),
    "include_reasoning": (True,),  # no reasoning parser here: all text is content, as vLLM without one
    "priority": (0,),
    "routed_experts_prompt_start": (0,),
}


def is_noop(key: str, value: Any) -> bool:
    """Whether `value` for the refused field `key` leaves the output as if it were absent."""
    if value is None or isinstance(value, (str, list, dict)) and not value:
        return True
    # compared with their types: True == 1 in Python, and best_of: true is not best_of: 1
    return any(type(value) is type(d) and value == d for d in _DEFAULTS.get(key, (False,)))

"""Result objects with vLLM's field names."""
from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, float]] | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True
    # with SamplingParams.prompt_logprobs: None for the first prompt token, then per token
    # {its id: logprob, then the top ids: logprob} (its own first, as vLLM orders them)
    prompt_logprobs: list[dict[int, float] | None] | None = None

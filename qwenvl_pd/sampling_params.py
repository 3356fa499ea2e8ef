"""SamplingParams with vLLM's field names and defaults, so offline scripts port unchanged."""
from dataclasses import dataclass, field


@dataclass(frozen=True)
class StructuredOutputsParams:
    """vLLM's StructuredOutputsParams: exactly one of json (a JSON schema, as JSON text), regex,
    choice, grammar (Lark, llguidance's syntax; GBNF is converted) or json_object is set.
    resume_token_ids: tokens the grammar already accepted that a continuation (re-prefill after
    a hand-back) carries as prompt, so the matcher resumes where decode stopped."""
    json: str | None = None
    regex: str | None = None
    choice: tuple[str, ...] = ()
    grammar: str | None = None
    json_object: bool = False
    resume_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "choice", tuple(self.choice))
        object.__setattr__(self, "resume_token_ids", tuple(self.resume_token_ids))
        kinds = [self.json is not None, self.regex is not None, bool(self.choice),
                 self.grammar is not None, self.json_object]
        if sum(kinds) != 1:
            raise ValueError("structured outputs need exactly one of json, regex, choice, grammar, "
                             "json_object")


@dataclass(frozen=True)
class SamplingParams:
    """Frozen: one object travels from the caller through the messages into the engine's
    sequences, so nothing downstream can change what an earlier stage checked. Normalized and
    checked once, here (dataclasses.replace builds a new one, checked again)."""
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    max_completion_tokens: int | None = None  # the OpenAI name; wins over max_tokens when set
    min_tokens: int = 0
    stop: list[str] | str | None = None  # a str is kept as [str]
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    # top alternatives per prompt position, besides the prompt's own token (vLLM's): prefill
    # then keeps the raw log-softmax at every prompt position, and reads no prefix cache
    prompt_logprobs: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    skip_special_tokens: bool = True
    # byte-level BPE (Qwen's) decodes adjacent added tokens with no space either way, as
    # transformers' fast tokenizers and vLLM do: accepted for compatibility, never on the wire
    spaces_between_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None  # added to the logits before penalties (vLLM's order)
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self):
        if self.max_completion_tokens is not None:
            object.__setattr__(self, "max_tokens", self.max_completion_tokens)
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", [self.stop])
        if self.logit_bias is not None:
            object.__setattr__(self, "logit_bias", {int(t): float(b) for t, b in self.logit_bias.items()} or None)
        self._check()

    def _check(self) -> None:
        checks = [
            (self.n >= 1, "n must be >= 1"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k == -1 or self.top_k >= 1, "top_k must be -1 (off) or >= 1"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens must be >= 1"),
            (self.min_tokens >= 0, "min_tokens must be >= 0"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs must be in [0, 20]"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
             "prompt_logprobs must be in [0, 20]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

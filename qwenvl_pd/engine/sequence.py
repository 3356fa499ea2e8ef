"""A request as the engine sees it: tokens, positions, KV blocks and the state of its sampling."""
from collections import abc
from dataclasses import dataclass, field
from enum import Enum

import torch

from qwenvl_pd.finish_reason import FinishReason
from qwenvl_pd.model.inputs import MMItem
from qwenvl_pd.model.vision import VisionEmbeds
from qwenvl_pd.sampling_params import SamplingParams


class Status(Enum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


@dataclass(eq=False)  # by identity, so hashable: the runner keys block-table rows by sequence
class Sequence:
    request_id: str
    token_ids: list[int]
    prompt_positions: torch.Tensor  # [3, prompt_len] M-RoPE positions of the prompt
    mrope_delta: int                # decode position = token index + delta, on all three rows
    params: SamplingParams
    items: list[MMItem] = field(default_factory=list)
    vision: VisionEmbeds | None = None  # embeddings of the prompt's placeholders, in order
    block_ids: list[int] = field(default_factory=list)
    num_computed: int = 0           # tokens whose K/V are in the cache
    num_cached: int = 0             # prompt tokens served by the prefix cache
    status: Status = Status.WAITING
    finish_reason: FinishReason | None = None
    logprobs: list = field(default_factory=list)  # per output token: (logprob, top list) or None
    prompt_logprobs: list = field(default_factory=list)  # prompt_logprobs.PromptRows, chunk by chunk
    block_hashes: list[bytes] = field(default_factory=list)  # of its full blocks, as far as sealed
    grammar: object = None  # engine.grammar.Matcher once a structured-output row first samples
    cache_salt: str = ""  # folded into the first block's hash: hits only among the same salt
    prompt_len: int = field(init=False)

    def __post_init__(self):
        self.prompt_len = len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def finished(self) -> bool:
        return self.status == Status.FINISHED

    @property
    def mm_spans(self) -> list[tuple[int, int, str]]:
        # the salt rides as an item over token 0: it enters block 0's hash and so every later one
        salt = [(0, 1, "cache_salt:" + self.cache_salt)] if self.cache_salt else []
        return salt + [(*it.span, it.content_hash) for it in self.items]

    def positions(self, start: int, end: int) -> torch.Tensor:
        """M-RoPE positions [3, end-start] of tokens start..end-1."""
        head = self.prompt_positions[:, start:min(end, self.prompt_len)]
        tail = torch.arange(max(start, self.prompt_len), max(end, self.prompt_len)) + self.mrope_delta
        return torch.cat([head, tail.expand(3, -1)], dim=1)


class TokenSpan(abc.Sequence):
    """tokens[start:stop] read in place: a copy per row and step would cost O(context) where
    most samplers only count the tokens."""
    __slots__ = ("_tokens", "_start", "_stop")

    def __init__(self, tokens: list[int], start: int, stop: int | None = None):
        self._tokens, self._start = tokens, start
        self._stop = len(tokens) if stop is None else stop

    def __len__(self) -> int:
        return self._stop - self._start

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self._tokens[self._start:self._stop][i]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return self._tokens[self._start + i % len(self)]

    def __iter__(self):
        return iter(self._tokens[self._start:self._stop])


@dataclass
class ScheduledChunk:
    seq: Sequence
    num_tokens: int  # tokens of seq to compute this step, from seq.num_computed on

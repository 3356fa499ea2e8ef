"""Prompt logprobs (vLLM's `prompt_logprobs`): at every prompt position p < prompt_len - 1, the
raw log-softmax of the logits there scores the prompt's next token p + 1. Raw means the model's
own distribution: no temperature, penalty, grammar or top-k/top-p, as vLLM reports them.

A chunk's rows are reduced as soon as the forward has them: the next token's logprob and rank,
and the top k. Only those rows are kept on the sequence, never a [prompt_len, vocab] tensor.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qwenvl_pd.engine.sequence import ScheduledChunk, Sequence


@dataclass(frozen=True)
class PromptRows:
    """Reduced rows of consecutive prompt positions (a chunk's, or a whole prompt's)."""
    logprobs: torch.Tensor  # [n] of the prompt's next token
    ranks: torch.Tensor     # [n] int64: 1 + how many tokens score higher (ties count, as vLLM)
    top_ids: torch.Tensor   # [n, k] best first
    top_logprobs: torch.Tensor  # [n, k]


def num_rows(chunk: ScheduledChunk) -> int:
    """Prompt positions of `chunk` (before its forward) whose logits score a prompt token."""
    seq = chunk.seq
    if seq.params.prompt_logprobs is None:
        return 0
    end = min(seq.num_computed + chunk.num_tokens, seq.prompt_len - 1)
    return max(0, end - seq.num_computed)


def reduce(logits: torch.Tensor, targets: torch.Tensor, k: int) -> PromptRows:
    """logits [n, vocab], targets [n] -> the targets' logprobs and ranks and the top k."""
    logprobs = logits.float().log_softmax(-1)
    chosen = logprobs.gather(1, targets[:, None])  # [n, 1]
    ranks = (logprobs >= chosen).sum(-1)
    top_logprobs, top_ids = logprobs.topk(min(k, logprobs.shape[1]), -1)
    return PromptRows(chosen.squeeze(1), ranks, top_ids, top_logprobs)


class PromptCollector:
    """Rank 0: takes the step's prompt-row logits slice by slice (the runner's order: the
    chunks' order, each chunk's positions in turn) and appends each sequence its rows."""

    def __init__(self, chunks: list[ScheduledChunk]):
        self.spans = [(c.seq, n) for c in chunks if (n := num_rows(c))]
        targets = [c.seq.token_ids[c.seq.num_computed + 1:c.seq.num_computed + 1 + n]
                   for c in chunks if (n := num_rows(c))]
        self.targets = torch.tensor([t for ts in targets for t in ts], dtype=torch.long)
        self.k = max((s.params.prompt_logprobs for s, _ in self.spans), default=0)
        self.parts: list[PromptRows] = []
        self.at = 0

    def __len__(self) -> int:
        return len(self.targets)

    def __call__(self, logits: torch.Tensor) -> None:
        targets = self.targets[self.at:self.at + len(logits)].to(logits.device)
        self.at += len(logits)
        self.parts.append(_cpu(reduce(logits, targets, self.k)))

    def finish(self) -> None:
        """Hand each sequence its rows (call once every slice went through __call__)."""
        if not self.spans:
            return
        rows = join(self.parts)
        start = 0
        for seq, n in self.spans:
            k = seq.params.prompt_logprobs
            seq.prompt_logprobs.append(PromptRows(rows.logprobs[start:start + n], rows.ranks[start:start + n],
                                                  rows.top_ids[start:start + n, :k],
                                                  rows.top_logprobs[start:start + n, :k]))
            start += n


def join(parts: list[PromptRows]) -> PromptRows:
    """Consecutive rows as one PromptRows (an empty list: no rows, k 0)."""
    if not parts:
        empty = torch.empty(0)
        return PromptRows(empty, empty.long(), torch.empty(0, 0, dtype=torch.long), torch.empty(0, 0))
    return PromptRows(*(torch.cat([getattr(p, f) for p in parts]) for f in
                        ("logprobs", "ranks", "top_ids", "top_logprobs")))


def of_sequence(seq: Sequence) -> PromptRows | None:
    """All of seq's prompt rows (positions 0 .. prompt_len - 2), or None when not requested."""
    if seq.params.prompt_logprobs is None:
        return None
    rows = join(seq.prompt_logprobs)
    if not seq.prompt_logprobs:  # a one-token prompt: no rows, but k columns all the same
        k = seq.params.prompt_logprobs
        return PromptRows(rows.logprobs, rows.ranks, rows.top_ids.view(0, k), rows.top_logprobs.view(0, k))
    return rows


def _cpu(rows: PromptRows) -> PromptRows:
    return PromptRows(rows.logprobs.cpu(), rows.ranks.cpu(), rows.top_ids.cpu(), rows.top_logprobs.cpu())

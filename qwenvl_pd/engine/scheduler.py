"""Continuous batching with chunked prefill under a token budget, admission by free KV blocks,
and preemption by recompute when blocks run out."""
from collections import deque
from dataclasses import dataclass

from qwenvl_pd.engine.block_manager import BlockManager, block_hashes
from qwenvl_pd.finish_reason import FinishReason
from qwenvl_pd.engine.sequence import ScheduledChunk, Sequence, Status


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    recompute_on_preempt: bool = True  # False on decode nodes: they cannot prefill again
    # waiting prompts join a step only while it holds fewer tokens than this (0: the budget):
    # a step's prompts finish together, so past the size where GEMMs run at full rate more
    # prompts only delay the first ones' tokens
    fill_tokens: int = 0

    @property
    def admit_below(self) -> int:
        return self.fill_tokens or self.max_num_batched_tokens


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, blocks: BlockManager):
        self.cfg = cfg
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.handed_back: list[Sequence] = []  # preempted without recompute, for the node to collect

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_prefilled(self, seq: Sequence) -> None:
        """Decode mode: seq's prompt K/V sit in seq.block_ids already (pulled from a prefill)."""
        seq.status = Status.RUNNING
        seq.num_computed = seq.prompt_len
        self.running.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledChunk]:
        budget, size = self.cfg.max_num_batched_tokens, self.blocks.block_size
        chunks: list[ScheduledChunk] = []
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status != Status.RUNNING:
                continue  # preempted earlier in this pass
            n = min(len(seq.token_ids) - seq.num_computed, budget)
            end = seq.num_computed + n
            # most steps a sequence still fits its blocks: no call for those
            if end <= len(seq.block_ids) * size or self._grow(seq, end):
                chunks.append(ScheduledChunk(seq, n))
                budget -= n
        full = self.cfg.max_num_batched_tokens - self.cfg.admit_below
        while self.waiting and budget > full and len(self.running) < self.cfg.max_num_seqs:
            chunk = self._admit(self.waiting[0], budget)
            if chunk is None:
                break
            self.waiting.popleft()
            chunks.append(chunk)
            budget -= chunk.num_tokens
        return chunks

    def _admit(self, seq: Sequence, budget: int) -> ScheduledChunk | None:
        # a cached prefix has no logits: prompt logprobs need every position computed (vLLM's rule)
        read = seq.params.prompt_logprobs is None
        if not self.blocks.can_allocate(seq.token_ids, seq.mm_spans, read):
            return None
        alloc = self.blocks.allocate(seq.token_ids, seq.mm_spans, read)
        seq.block_ids = list(alloc.block_ids)
        seq.num_computed = alloc.num_cached_tokens
        seq.num_cached = alloc.num_cached_tokens
        seq.status = Status.RUNNING
        self.running.append(seq)
        return ScheduledChunk(seq, min(len(seq.token_ids) - seq.num_computed, budget))

    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Make seq hold blocks for num_tokens, preempting the newest others if needed."""
        while self.blocks.blocks_needed(num_tokens) > len(seq.block_ids):
            if self.blocks.can_allocate_n(1):
                new = self.blocks.append_slot(seq.block_ids, len(seq.block_ids) * self.blocks.block_size + 1)
                seq.block_ids.append(new)
                continue
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        self.running.remove(seq)
        self.blocks.free(seq.block_ids)
        seq.block_ids, seq.num_computed = [], 0
        seq.prompt_logprobs = []  # the recompute scores the prompt again
        if self.cfg.recompute_on_preempt:
            seq.status = Status.WAITING
            self.waiting.appendleft(seq)
        else:
            seq.status, seq.finish_reason = Status.FINISHED, FinishReason.PREEMPTED
            self.handed_back.append(seq)

    def seal(self, chunks: list[ScheduledChunk]) -> None:
        """After a forward: register blocks that became full so later prompts can share them.
        Only the blocks each chunk completed: the ones before were sealed when they filled, or
        came from the prefix cache."""
        if not self.blocks.enable_prefix_caching:
            return
        size = self.blocks.block_size
        for c in chunks:
            s = c.seq
            if c.num_tokens == 1 and s.num_computed % size:
                continue  # a decode token that did not fill its block: the common case
            first, full = (s.num_computed - c.num_tokens) // size, s.num_computed // size
            if full > first:
                self.blocks.seal_hashes(s.block_ids[first:full], self._hashes(s, full)[first:full])

    def _hashes(self, seq: Sequence, full: int) -> list[bytes]:
        # the chain is kept on the sequence: a block is hashed once, not at every later seal
        have, size = seq.block_hashes, self.blocks.block_size
        if len(have) < full:
            have += block_hashes(seq.token_ids[:full * size], seq.mm_spans, size, len(have),
                                 have[-1] if have else b"")
        return have

    def finish(self, seq: Sequence, reason: FinishReason, keep_blocks: bool = False) -> None:
        seq.status, seq.finish_reason = Status.FINISHED, reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if not keep_blocks and seq.block_ids:
            self.blocks.free(seq.block_ids)
            seq.block_ids = []

"""One engine loop for every role: schedule -> run -> postprocess."""
import logging

import torch

from qwenvl_pd.model_config import ModelConfig
from qwenvl_pd.engine.block_manager import BlockManager
from qwenvl_pd.engine.commands import DuplicateRequest, EngineLoad, QueueFull, StepResult
from qwenvl_pd.engine.engine_config import EngineConfig, fill_tokens_for
from qwenvl_pd.engine.encoder_cache import EncoderCache
from qwenvl_pd.engine.grammar import Grammars
from qwenvl_pd.engine.graphs import DecodeGraphs
from qwenvl_pd.engine.kv_streams import KVStreams, Report
from qwenvl_pd.engine.kv_cache import allocate_kv_cache, blocks_for_memory, kv_budget_bytes
from qwenvl_pd.engine.model_runner import ModelRunner, ScheduledChunk
from qwenvl_pd.engine.sampler import SamplerInput, sample
from qwenvl_pd.engine.scheduler import Scheduler, SchedulerConfig
from qwenvl_pd.finish_reason import FinishReason
from qwenvl_pd.engine.sequence import Sequence, TokenSpan
from qwenvl_pd.model.parallel import TensorParallel
from qwenvl_pd.platform import graph_api

log = logging.getLogger(__name__)


def build_runner(model, config: ModelConfig, cfg: EngineConfig, dtype: torch.dtype,
                 tp: TensorParallel = TensorParallel(), channel=None) -> ModelRunner:
    """This rank's KV region, decode graphs and runner; every rank builds the same shapes."""
    device = next(model.parameters()).device
    kv_heads = tp.kv_heads(config.text.num_kv_heads)[1]
    budget = kv_budget_bytes(cfg.kv_cache_bytes, cfg.gpu_memory_utilization, device)
    num_blocks = cfg.num_kv_blocks or blocks_for_memory(config.text, cfg.block_size, dtype, budget, kv_heads)
    # one extra block at the end that no request owns: padded graph rows write there
    kv_cache = allocate_kv_cache(config.text, num_blocks + 1, cfg.block_size, dtype, device, kv_heads)
    graphs = _graphs(model, config, cfg, kv_cache, num_blocks)
    return ModelRunner(model, kv_cache, cfg.block_size, graphs, channel)


def _graphs(model, config: ModelConfig, cfg: EngineConfig, kv_cache: torch.Tensor, scratch: int):
    api = graph_api(kv_cache.device)
    # MoE routing syncs with the host (which experts are hit): not capturable
    wanted = cfg.decode_graphs == "eager" or (
        cfg.decode_graphs == "auto" and api is not None and config.text.num_experts == 0)
    if not wanted:
        return None
    max_blocks = -(-cfg.max_model_len // cfg.block_size)
    return DecodeGraphs(model, kv_cache, cfg.block_size, max_blocks, cfg.max_num_seqs,
                        scratch, api if cfg.decode_graphs == "auto" else None)


class LLMEngine:
    """The engine of one instance. A node drives it only through these methods (on its engine
    thread: EngineLoop), never through its scheduler or block manager."""

    def __init__(self, model, config: ModelConfig, cfg: EngineConfig, dtype: torch.dtype,
                 tp: TensorParallel = TensorParallel(), channel=None, grammars: Grammars | None = None):
        self.model, self.config, self.cfg, self.grammars = model, config, cfg, grammars
        self.runner = build_runner(model, config, cfg, dtype, tp, channel)
        self.kv_cache = self.runner.kv_cache
        self.blocks = BlockManager(self.kv_cache.shape[2] - 1, cfg.block_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig(
            cfg.max_num_seqs, cfg.max_num_batched_tokens,
            recompute_on_preempt=cfg.recompute_on_preempt,
            fill_tokens=fill_tokens_for(cfg, self.kv_cache.device.type)), self.blocks)
        self.encoder_cache = EncoderCache(cfg.encoder_cache_bytes)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.requests_total = 0
        self.live: dict[str, Sequence] = {}  # unfinished sequences by request id
        self.kv_streams: KVStreams | None = None  # set by stream_layers(): prefill's layer-wise KV

    def stream_layers(self, group: int, report: Report) -> KVStreams:
        """Report the layer-wise KV progress of watched sequences every `group` layers."""
        device = next(self.model.parameters()).device
        self.kv_streams = KVStreams(self.model.language_model(), self.config.text.num_layers, group,
                                    report, device)
        return self.kv_streams

    def check_pool(self) -> None:
        """Raise ValueError when the KV pool cannot hold one max_model_len sequence: such a prompt
        would wait for blocks forever, so a server refuses to start instead."""
        blocks, max_len = self.blocks, self.cfg.max_model_len
        if blocks.num_blocks * blocks.block_size < max_len:
            raise ValueError(f"the KV pool holds {blocks.num_blocks * blocks.block_size} tokens "
                             f"({blocks.num_blocks} blocks), less than max_model_len {max_len}: "
                             "raise --kv-cache-gib or lower --max-model-len")

    def add(self, seq: Sequence, max_waiting: int | None = None, stream_layers: bool = False) -> None:
        """Queue seq for prefill. Raises DuplicateRequest if its request id is live, QueueFull
        once max_waiting requests wait; stream_layers reports its KV layer group by group."""
        self._admit(seq, max_waiting)
        if stream_layers:
            self.kv_streams.watch(seq.request_id)
        self.scheduler.add(seq)

    def join_prefilled(self, seq: Sequence) -> None:
        """Decode: seq's prompt KV sits in seq.block_ids (reserve_blocks, then a read); it joins
        the running batch and samples from its next step on."""
        self._admit(seq, None)
        self.scheduler.add_prefilled(seq)

    def _admit(self, seq: Sequence, max_waiting: int | None) -> None:
        if seq.request_id in self.live:
            raise DuplicateRequest(seq.request_id)
        self._check_queue(max_waiting)
        self.live[seq.request_id] = seq
        self.requests_total += 1

    def _check_queue(self, max_waiting: int | None) -> None:
        waiting = len(self.scheduler.waiting)
        if max_waiting is not None and waiting >= max_waiting:
            raise QueueFull(f"{waiting} requests waiting (--max-queued-requests {max_waiting}); "
                            "try again later")

    def abort(self, request_id: str) -> Sequence | None:
        """End request_id's live sequence now (ABORT, its blocks freed) -> it, or None."""
        seq = self.live.get(request_id)
        if seq is not None:
            self.finish(seq, FinishReason.ABORT)
        return seq

    def reserve_blocks(self, n: int, max_waiting: int | None = None) -> list[int]:
        """n blocks owned by the caller until free_blocks (decode: the target of a KV read).
        Raises QueueFull as add does, OutOfBlocks when the pool cannot give n."""
        self._check_queue(max_waiting)
        return self.blocks.allocate_n(n)

    def free_blocks(self, block_ids) -> None:
        """Give back blocks no sequence owns: a reservation, or a prefilled sequence's blocks
        that the engine kept for the handoff (finish reason PREFILLED)."""
        self.blocks.free(block_ids)

    def load(self) -> EngineLoad:
        """The counters for a load report; safe to call from any thread."""
        s, b = self.scheduler, self.blocks
        return EngineLoad(len(s.running), len(s.waiting), b.num_used_blocks, b.num_blocks,
                          b.prefix_queries, b.prefix_hits, self.requests_total)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> StepResult:
        """One forward over what the scheduler picked: schedule -> run -> postprocess."""
        chunks = self.scheduler.schedule()
        handed_back = self._take_handed_back()
        if not chunks:
            return StepResult(handed_back=handed_back)
        self._encode_vision(chunks)
        streams = self.kv_streams
        if streams is not None:
            streams.begin(chunks)
        logits = self.runner.run(chunks)
        for c in chunks:
            c.seq.num_computed += c.num_tokens
        if streams is not None:
            streams.end()
        self.scheduler.seal(chunks)
        sampled = self._postprocess(chunks, logits)
        return StepResult(sampled, tuple(s for s in sampled if s.finished), handed_back)

    def _take_handed_back(self) -> tuple[Sequence, ...]:
        seqs, self.scheduler.handed_back = tuple(self.scheduler.handed_back), []
        for seq in seqs:
            self.live.pop(seq.request_id, None)
        return seqs

    def _encode_vision(self, chunks: list[ScheduledChunk]) -> None:
        for c in chunks:
            s = c.seq
            if s.items and s.vision is None and s.num_computed < s.prompt_len:
                s.vision = self.encoder_cache.encode(self.model, s.items)

    def _postprocess(self, chunks: list[ScheduledChunk], logits: torch.Tensor) -> tuple[Sequence, ...]:
        # partial prefill chunks produce no token: only rows that reached the sequence's end sample
        done = [i for i, c in enumerate(chunks) if c.seq.num_computed == len(c.seq.token_ids)]
        if not done:
            return ()
        seqs = [chunks[i].seq for i in done]
        rows = logits if len(done) == len(chunks) else logits[done]
        matchers = [self._matcher(s) for s in seqs]
        bitmask = self.grammars.bitmask(matchers) if self.grammars is not None else None
        results = sample(rows, [self._sampler_input(s) for s in seqs], self.generator, bitmask)
        for seq, m, r in zip(seqs, matchers, results):
            seq.token_ids.append(r.token_id)
            if seq.params.logprobs is not None:
                seq.logprobs.append((r.logprob, r.top_logprobs))
            if m is not None and not m.accept(r.token_id):
                # only when other masks leave the grammar nothing (min_tokens against its end)
                log.warning("request %s: grammar rejected token %d: %s", seq.request_id,
                            r.token_id, m.error)
                self.finish(seq, FinishReason.STOP)
                continue
            self._check_finish(seq, r.token_id)
        return tuple(seqs)

    def _matcher(self, seq: Sequence):
        """The row's grammar matcher, built on its first sample: on decode it then accepts what
        prefill sampled (and a continuation's earlier tokens come in resume_token_ids)."""
        spec = seq.params.structured_outputs
        if spec is None or self.grammars is None:
            return None
        if seq.grammar is None:
            seq.grammar = self.grammars.matcher(spec)
            for t in seq.output_ids:
                seq.grammar.accept(t)
        return seq.grammar

    def _sampler_input(self, seq: Sequence) -> SamplerInput:
        tokens = seq.token_ids
        return SamplerInput(seq.params, len(tokens), TokenSpan(tokens, 0, seq.prompt_len),
                            TokenSpan(tokens, seq.prompt_len), self.config.eos_token_ids)

    def _check_finish(self, seq: Sequence, token: int) -> None:
        p = seq.params
        stop = token in p.stop_token_ids or (not p.ignore_eos and token in self.config.eos_token_ids)
        if stop and seq.num_output >= p.min_tokens:
            self.finish(seq, FinishReason.STOP)
        elif seq.num_output >= p.max_tokens:
            self.finish(seq, FinishReason.LENGTH)
        elif self.cfg.finish_after_prefill:
            self.finish(seq, FinishReason.PREFILLED)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """End seq with reason; its blocks are freed, but for PREFILLED: those the caller gives
        back with free_blocks once decode has read them (the prefill node's lease)."""
        keep = reason == FinishReason.PREFILLED
        self.scheduler.finish(seq, reason, keep_blocks=keep)
        self.live.pop(seq.request_id, None)
        if self.kv_streams is not None:
            self.kv_streams.unwatch(seq.request_id)

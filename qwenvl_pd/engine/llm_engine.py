"""One engine loop for every role: schedule -> run -> postprocess."""
import logging

import torch

from qwenvl_pd.config import ModelConfig
from qwenvl_pd.engine.block_manager import BlockManager
from qwenvl_pd.engine.config import EngineConfig
from qwenvl_pd.engine.encoder_cache import EncoderCache
from qwenvl_pd.engine.grammar import Grammars
from qwenvl_pd.engine.graphs import DecodeGraphs
from qwenvl_pd.engine.kv_streams import KVStreams, Report
from qwenvl_pd.engine.kv_cache import allocate_kv_cache, blocks_for_memory, kv_budget_bytes
from qwenvl_pd.engine.model_runner import ModelRunner, ScheduledChunk
from qwenvl_pd.engine.sampler import SamplerInput, sample
from qwenvl_pd.engine.scheduler import Scheduler, SchedulerConfig
from qwenvl_pd.engine.sequence import FinishReason, Sequence, TokenSpan
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
    def __init__(self, model, config: ModelConfig, cfg: EngineConfig, dtype: torch.dtype,
                 tp: TensorParallel = TensorParallel(), channel=None, grammars: Grammars | None = None):
        self.model, self.config, self.cfg, self.grammars = model, config, cfg, grammars
        self.runner = build_runner(model, config, cfg, dtype, tp, channel)
        self.kv_cache = self.runner.kv_cache
        self.blocks = BlockManager(self.kv_cache.shape[2] - 1, cfg.block_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig(
            cfg.max_num_seqs, cfg.max_num_batched_tokens,
            recompute_on_preempt=cfg.recompute_on_preempt), self.blocks)
        self.encoder_cache = EncoderCache(cfg.encoder_cache_bytes)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.requests_total = 0
        self.kv_streams: KVStreams | None = None  # set by stream_layers(): prefill's layer-wise KV

    def stream_layers(self, group: int, report: Report) -> KVStreams:
        """Report the layer-wise KV progress of watched sequences every `group` layers."""
        device = next(self.model.parameters()).device
        self.kv_streams = KVStreams(self.model.language_model(), self.config.text.num_layers, group,
                                    report, device)
        return self.kv_streams

    def add(self, seq: Sequence) -> None:
        self.requests_total += 1
        self.scheduler.add(seq)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[Sequence]:
        """One forward over what the scheduler picked; returns the sequences that got a token."""
        chunks = self.scheduler.schedule()
        if not chunks:
            return []
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
        return self._postprocess(chunks, logits)

    def _encode_vision(self, chunks: list[ScheduledChunk]) -> None:
        for c in chunks:
            s = c.seq
            if s.items and s.vision is None and s.num_computed < s.prompt_len:
                s.vision = self.encoder_cache.encode(self.model, s.items)

    def _postprocess(self, chunks: list[ScheduledChunk], logits: torch.Tensor) -> list[Sequence]:
        # partial prefill chunks produce no token: only rows that reached the sequence's end sample
        done = [i for i, c in enumerate(chunks) if c.seq.num_computed == len(c.seq.token_ids)]
        if not done:
            return []
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
        return seqs

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
        keep = reason == FinishReason.PREFILLED  # the prefill node holds them under a lease
        self.scheduler.finish(seq, reason, keep_blocks=keep)

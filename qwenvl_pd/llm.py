"""The offline API, vLLM's shape: LLM(model=...).generate(prompts, SamplingParams(...))."""
import itertools
import logging
from pathlib import Path

import torch
from transformers import AutoTokenizer

from qwenvl_pd.config import ModelConfig
from qwenvl_pd.engine.kv_cache import allocate_kv_cache, blocks_for_memory
from qwenvl_pd.engine.model_runner import ModelRunner, ScheduledChunk
from qwenvl_pd.engine.sampler import sample
from qwenvl_pd.engine.sequence import FinishReason, Sequence
from qwenvl_pd.model.inputs import InputProcessor, ProcessedPrompt
from qwenvl_pd.model.loader import load_model
from qwenvl_pd.outputs import CompletionOutput, RequestOutput
from qwenvl_pd.platform import default_dtype, detect_device
from qwenvl_pd.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class LLM:
    def __init__(self, model: str, max_model_len: int | None = None,
                 limit_mm_per_prompt: dict[str, int] | None = None, dtype: str = "auto",
                 device: str | None = None, block_size: int = 16, kv_cache_bytes: int = 1 << 30,
                 seed: int = 0, tensor_parallel_size: int = 1, **ignored):
        if tensor_parallel_size != 1:
            log.warning("tensor_parallel_size=%d: this build runs one replica per process",
                        tensor_parallel_size)
        if ignored:
            log.info("ignoring engine options not used here: %s", ", ".join(sorted(ignored)))
        self.config = ModelConfig.from_hf(model)
        self.device = detect_device(device)
        dtype_ = default_dtype(self.device, dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.max_model_len = max_model_len or self.config.text.max_position_embeddings
        self.inputs = InputProcessor(Path(model), self.config, self.tokenizer.encode,
                                     self.max_model_len, limit_mm_per_prompt or {})
        self.model = load_model(model, self.config, dtype_, self.device)
        self.block_size = block_size
        num_blocks = blocks_for_memory(self.config.text, block_size, dtype_, kv_cache_bytes)
        cache = allocate_kv_cache(self.config.text, num_blocks, block_size, dtype_, self.device)
        self.runner = ModelRunner(self.model, cache, block_size)
        self.free_blocks = list(range(num_blocks))
        self.generator = torch.Generator().manual_seed(seed)
        self._ids = itertools.count()

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        params = sampling_params or SamplingParams()
        params = params if isinstance(params, list) else [params] * len(prompts)
        # validate every prompt before any compute: one bad prompt fails the call cleanly
        processed = [self.inputs.process(p) for p in prompts]
        for prompt, p in zip(processed, params):
            self._check_length(prompt, p)
        seqs = [self._sequence(prompt, p) for prompt, p in zip(processed, params) for _ in range(p.n)]
        self._run(seqs)
        return self._outputs(prompts, processed, params, seqs)

    def _check_length(self, prompt: ProcessedPrompt, p: SamplingParams) -> None:
        need = len(prompt.token_ids) + (p.max_tokens or 1)
        if need > self.max_model_len:
            raise ValueError(f"prompt ({len(prompt.token_ids)} tokens) + max_tokens "
                             f"({p.max_tokens}) exceeds max_model_len ({self.max_model_len})")
        if self._blocks_needed(need) > len(self.free_blocks):
            raise ValueError(f"request needs {need} tokens of KV cache; the pool holds "
                             f"{len(self.free_blocks) * self.block_size}")

    def _sequence(self, prompt: ProcessedPrompt, p: SamplingParams) -> Sequence:
        if p.max_tokens is None:
            p = SamplingParams(**{**vars(p), "max_tokens": self.max_model_len - len(prompt.token_ids),
                                  "max_completion_tokens": None})
        vision = prompt.encode_vision(self.model)
        return Sequence(str(next(self._ids)), list(prompt.token_ids), prompt.positions,
                        prompt.mrope_delta, p, vision)

    def _blocks_needed(self, tokens: int) -> int:
        return (tokens + self.block_size - 1) // self.block_size

    def _run(self, seqs: list[Sequence]) -> None:
        pending = list(seqs)
        while pending:
            # a plain wave loop: admit what fits, prefill it, decode until all finish
            wave = []
            while pending and self._admit(pending[0]):
                wave.append(pending.pop(0))
            self._step(wave)
            while live := [s for s in wave if not s.finished]:
                self._step(live)
            for s in wave:
                self.free_blocks.extend(s.block_ids)
                s.block_ids = []

    def _admit(self, seq: Sequence) -> bool:
        n = self._blocks_needed(seq.prompt_len + seq.params.max_tokens)
        if n > len(self.free_blocks):
            return False
        seq.block_ids, self.free_blocks = self.free_blocks[:n], self.free_blocks[n:]
        return True

    def _step(self, seqs: list[Sequence]) -> None:
        chunks = [ScheduledChunk(s, len(s.token_ids) - s.num_computed) for s in seqs]
        logits = self.runner.run(chunks)
        tokens = sample(logits, [s.params for s in seqs], [len(s.token_ids) for s in seqs],
                        self.generator)
        for s, c, t in zip(seqs, chunks, tokens):
            s.num_computed += c.num_tokens
            self._append(s, t)

    def _append(self, seq: Sequence, token: int) -> None:
        seq.token_ids.append(token)
        p, n_out = seq.params, len(seq.token_ids) - seq.prompt_len
        stops = set(p.stop_token_ids) | (set() if p.ignore_eos else set(self.config.eos_token_ids))
        if n_out >= p.min_tokens and token in stops:
            seq.finish_reason = FinishReason.STOP
        elif n_out >= p.max_tokens:
            seq.finish_reason = FinishReason.LENGTH

    def _outputs(self, prompts, processed, params, seqs) -> list[RequestOutput]:
        results, it = [], iter(seqs)
        for raw, prompt, p in zip(prompts, processed, params):
            outs = []
            for i in range(p.n):
                s = next(it)
                ids = s.output_ids
                text = self.tokenizer.decode(ids, skip_special_tokens=p.skip_special_tokens)
                outs.append(CompletionOutput(i, text, ids, s.finish_reason.value))
            text = raw.get("prompt") if isinstance(raw, dict) else raw
            results.append(RequestOutput(str(len(results)), text, list(prompt.token_ids), outs))
        return results

"""The offline API, vLLM's shape: LLM(model=...).generate(prompts, SamplingParams(...))."""
import dataclasses
import itertools
import logging

from transformers import AutoTokenizer

from qwenvl_pd.config import ModelConfig
from qwenvl_pd.engine.llm_engine import EngineConfig, LLMEngine
from qwenvl_pd.engine.sequence import FinishReason, Sequence
from qwenvl_pd.model.inputs import InputProcessor, ProcessedPrompt
from qwenvl_pd.model.loader import load_model
from qwenvl_pd.outputs import CompletionOutput, RequestOutput
from qwenvl_pd.platform import default_dtype, detect_device
from qwenvl_pd.sampling_params import SamplingParams

log = logging.getLogger(__name__)
ENGINE_OPTIONS = {f.name for f in dataclasses.fields(EngineConfig)}


class LLM:
    def __init__(self, model: str, max_model_len: int | None = None,
                 limit_mm_per_prompt: dict[str, int] | None = None, dtype: str = "auto",
                 device: str | None = None, tensor_parallel_size: int = 1, **options):
        if tensor_parallel_size != 1:
            log.warning("tensor_parallel_size=%d: this build runs one replica per process",
                        tensor_parallel_size)
        ignored = sorted(set(options) - ENGINE_OPTIONS)
        if ignored:
            log.info("ignoring engine options not used here: %s", ", ".join(ignored))
        self.config = ModelConfig.from_hf(model)
        device_ = detect_device(device)
        dtype_ = default_dtype(device_, dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.max_model_len = max_model_len or self.config.text.max_position_embeddings
        self.inputs = InputProcessor(model, self.config, self.tokenizer.encode,
                                     self.max_model_len, limit_mm_per_prompt or {})
        self.model = load_model(model, self.config, dtype_, device_)
        engine_cfg = EngineConfig(**{"max_model_len": self.max_model_len,
                                     **{k: v for k, v in options.items() if k in ENGINE_OPTIONS}})
        self.engine = LLMEngine(self.model, self.config, engine_cfg, dtype_)
        self._ids = itertools.count()

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        params = sampling_params or SamplingParams()
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        # validate every prompt before any compute: one bad prompt fails the call cleanly
        processed = [self.inputs.process(p) for p in prompts]
        params = [self._resolve(prompt, p) for prompt, p in zip(processed, params)]
        groups = [[self._sequence(prompt, p, i) for i in range(p.n)] for prompt, p in zip(processed, params)]
        for seq in itertools.chain.from_iterable(groups):
            self.engine.add(seq)
        self._run_to_completion()
        return [self._output(raw, prompt, seqs) for raw, prompt, seqs in zip(prompts, processed, groups)]

    def _resolve(self, prompt: ProcessedPrompt, p: SamplingParams) -> SamplingParams:
        room = self.max_model_len - len(prompt.token_ids)
        if p.max_tokens is None:
            p = dataclasses.replace(p, max_tokens=room, max_completion_tokens=None)
        if p.max_tokens > room:
            raise ValueError(f"prompt ({len(prompt.token_ids)} tokens) + max_tokens "
                             f"({p.max_tokens}) exceeds max_model_len ({self.max_model_len})")
        blocks = self.engine.blocks
        if blocks.blocks_needed(len(prompt.token_ids) + p.max_tokens) > blocks.num_blocks:
            raise ValueError(f"request needs {len(prompt.token_ids) + p.max_tokens} tokens of KV "
                             f"cache; the pool holds {blocks.num_blocks * blocks.block_size}")
        return p

    def _sequence(self, prompt: ProcessedPrompt, p: SamplingParams, index: int) -> Sequence:
        if p.n > 1 and p.seed is not None:
            # n samples of one seeded request must differ: one seed per sample, as the proxy does
            p = dataclasses.replace(p, seed=p.seed + index * 7919)
        return Sequence(str(next(self._ids)), list(prompt.token_ids), prompt.positions,
                        prompt.mrope_delta, p, items=prompt.items)

    def _run_to_completion(self) -> None:
        while self.engine.has_work():
            for seq in self.engine.step():
                if not seq.finished and seq.params.stop and self._hit_stop(seq):
                    self.engine.finish(seq, FinishReason.STOP)

    def _hit_stop(self, seq: Sequence) -> bool:
        tail = self.tokenizer.decode(seq.output_ids[-16:], skip_special_tokens=True)
        return any(s in tail for s in seq.params.stop)

    def _output(self, raw, prompt: ProcessedPrompt, seqs: list[Sequence]) -> RequestOutput:
        outs = [self._completion(i, s) for i, s in enumerate(seqs)]
        text = raw.get("prompt") if isinstance(raw, dict) else raw
        return RequestOutput(seqs[0].request_id, text, list(prompt.token_ids), outs)

    def _completion(self, index: int, seq: Sequence) -> CompletionOutput:
        p = seq.params
        text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=p.skip_special_tokens)
        for s in p.stop or []:
            if s in text:
                text = text[:text.index(s)]
        logprobs = None
        if p.logprobs is not None:
            logprobs = [dict(top) | {t: lp} for t, (lp, top) in zip(seq.output_ids, seq.logprobs)]
        return CompletionOutput(index, text, seq.output_ids, seq.finish_reason.value,
                                logprobs=logprobs)

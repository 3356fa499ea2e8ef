"""The offline API, vLLM's shape: LLM(model=...).generate(prompts, SamplingParams(...))."""
import dataclasses
import itertools
import logging
import weakref

from qwenvl_pd.engine import prompt_logprobs
from qwenvl_pd.engine.engine_config import EngineConfig
from qwenvl_pd.finish_reason import FinishReason
from qwenvl_pd.engine.sequence import Sequence
from qwenvl_pd.engine.stack import StackConfig, build_stack
from qwenvl_pd.model.inputs import ProcessedPrompt
from qwenvl_pd.outputs import CompletionOutput, RequestOutput
from qwenvl_pd.sampling_params import SamplingParams

log = logging.getLogger(__name__)
ENGINE_OPTIONS = {f.name for f in dataclasses.fields(EngineConfig)}


class LLM:
    def __init__(self, model: str, max_model_len: int | None = None,
                 limit_mm_per_prompt: dict[str, int] | None = None, dtype: str = "auto",
                 device: str | None = None, tensor_parallel_size: int = 1,
                 enable_expert_parallel: bool = False, quantization: str | None = None, **options):
        ignored = sorted(set(options) - ENGINE_OPTIONS)
        if ignored:
            log.info("ignoring engine options not used here: %s", ", ".join(ignored))
        engine = EngineConfig(**{k: v for k, v in options.items() if k in ENGINE_OPTIONS})
        self.stack = build_stack(StackConfig(
            model, max_model_len, device or "auto", dtype, tensor_parallel_size,
            enable_expert_parallel, limit_mm_per_prompt=limit_mm_per_prompt or {}, engine=engine,
            quantization=quantization))
        weakref.finalize(self, self.stack.close)  # the other ranks stop with this LLM
        self.config, self.tokenizer, self.inputs = self.stack.config, self.stack.tokenizer, self.stack.inputs
        self.model, self.engine = self.stack.model, self.stack.engine
        self.max_model_len = self.engine.cfg.max_model_len
        self._ids = itertools.count()

    def close(self) -> None:
        """Stop the other tensor-parallel ranks now (they also stop when this LLM is collected)."""
        self.stack.close()

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
            for seq in self.engine.step().sampled:
                if not seq.finished and seq.params.stop and self._hit_stop(seq):
                    self.engine.finish(seq, FinishReason.STOP)

    def _hit_stop(self, seq: Sequence) -> bool:
        tail = self.tokenizer.decode(seq.output_ids[-16:], skip_special_tokens=True)
        return any(s in tail for s in seq.params.stop)

    def _output(self, raw, prompt: ProcessedPrompt, seqs: list[Sequence]) -> RequestOutput:
        outs = [self._completion(i, s) for i, s in enumerate(seqs)]
        text = raw.get("prompt") if isinstance(raw, dict) else raw
        return RequestOutput(seqs[0].request_id, text, list(prompt.token_ids), outs,
                             prompt_logprobs=_prompt_logprobs(seqs[0]))

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


def _prompt_logprobs(seq: Sequence) -> list[dict[int, float] | None] | None:
    rows = prompt_logprobs.of_sequence(seq)
    if rows is None:
        return None
    tokens, own = seq.token_ids[1:seq.prompt_len], rows.logprobs.tolist()
    tops = zip(rows.top_ids.tolist(), rows.top_logprobs.tolist())
    return [None] + [{t: lp} | dict(zip(ids, lps)) for t, lp, (ids, lps) in zip(tokens, own, tops)]

"""The one place that builds what serves a checkpoint: config, tokenizer, input processor, model
and engine (and, under tensor parallelism, the other ranks). LLM, the nodes and the colocated
backend all call build_stack."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import AutoTokenizer

from qwenvl_pd.model_config import ModelConfig
from qwenvl_pd.engine.engine_config import EngineConfig
from qwenvl_pd.engine.grammar import Grammars
from qwenvl_pd.engine.llm_engine import LLMEngine, build_runner
from qwenvl_pd.engine.model_runner import ModelRunner
from qwenvl_pd.engine.ranks import RankContext, Ranks, RankSpec, rank_device
from qwenvl_pd.model.inputs import InputProcessor
from qwenvl_pd.model.loader import load_model
from qwenvl_pd.model.parallel import TensorParallel, check_divisible
from qwenvl_pd.platform import default_dtype, detect_device
from qwenvl_pd.process import free_port


@dataclass(frozen=True)
class StackConfig:
    model: str
    max_model_len: int | None = None  # None: the checkpoint's max_position_embeddings
    device: str = "auto"
    dtype: str = "auto"
    tensor_parallel_size: int = 1
    enable_expert_parallel: bool = False
    threads: int = 0                  # torch CPU threads per rank (0: cores / ranks)
    limit_mm_per_prompt: dict = field(default_factory=dict, hash=False)
    engine: EngineConfig = EngineConfig()
    quantization: str | None = None   # "ascend" | "none"; None: detected from the checkpoint
    vision: bool = True               # False on decode nodes: they never encode an image


@dataclass
class Stack:
    config: ModelConfig
    tokenizer: object
    inputs: InputProcessor
    model: torch.nn.Module
    engine: LLMEngine
    dtype: torch.dtype
    tp: TensorParallel
    ranks: Ranks | None = None
    rank_state: object = None  # what rank_setup returned on rank 0

    def close(self) -> None:
        if self.ranks is not None:
            self.ranks.close()
            self.ranks = None


def build_stack(cfg: StackConfig, rank_setup: Callable[[RankContext], object] | None = None) -> Stack:
    """rank_setup runs on every rank once its KV cache exists (the nodes register it with
    Mooncake there); rank 0's result is Stack.rank_state."""
    config = ModelConfig.from_hf(cfg.model)
    max_len = cfg.max_model_len or config.text.max_position_embeddings
    engine_cfg = dataclasses.replace(cfg.engine, max_model_len=max_len)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    inputs = InputProcessor(cfg.model, config, tokenizer.encode, max_len, cfg.limit_mm_per_prompt)
    tp = TensorParallel(0, cfg.tensor_parallel_size, cfg.enable_expert_parallel)
    device = detect_device(cfg.device)
    dtype = default_dtype(device, cfg.dtype, config.torch_dtype)
    ranks = _start_ranks(cfg, config, tp, device, dtype, engine_cfg, rank_setup)
    try:
        model = load_model(cfg.model, config, dtype, rank_device(device.type, 0) if ranks else device, tp,
                           cfg.quantization, cfg.vision)
        grammars = Grammars(tokenizer, config.text.vocab_size, config.eos_token_ids)
        engine = LLMEngine(model, config, engine_cfg, dtype, tp, ranks and ranks.channel, grammars)
        context = RankContext(tp, engine.kv_cache, ranks and ranks.aux_group)
        state = rank_setup(context) if rank_setup is not None else None
        if ranks is not None:
            ranks.ready()
    except BaseException:
        if ranks is not None:
            ranks.close()
        raise
    return Stack(config, tokenizer, inputs, model, engine, dtype, tp, ranks, state)


def _start_ranks(cfg: StackConfig, config: ModelConfig, tp: TensorParallel, device: torch.device,
                 dtype: torch.dtype, engine_cfg: EngineConfig, rank_setup) -> Ranks | None:
    if tp.size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tp.size}")
    if tp.size == 1:
        return None
    check_divisible(config.text, tp)  # before any child starts
    # the cores this process may use (a --cpus pin, a cpuset), not the machine's
    threads = cfg.threads or max(1, len(os.sched_getaffinity(0)) // tp.size)
    return Ranks(RankSpec(cfg.model, tp, device.type, str(dtype).removeprefix("torch."),
                          engine_cfg, free_port(), threads, build_rank_runner, rank_setup,
                          cfg.quantization))


def build_rank_runner(spec: RankSpec) -> ModelRunner:
    """On ranks 1..N-1: the shard of the model and of the KV cache, and the runner over them."""
    config = ModelConfig.from_hf(spec.model_dir)
    dtype = getattr(torch, spec.dtype)
    model = load_model(spec.model_dir, config, dtype, rank_device(spec.device_type, spec.tp.rank),
                       spec.tp, spec.quantization)
    return build_runner(model, config, spec.engine, dtype, spec.tp)

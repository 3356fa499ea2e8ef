"""The engine's settings, built once by the CLI or LLM and passed down."""
from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    # a prefill node stops each request at its first token and keeps the blocks for the handoff
    finish_after_prefill: bool = False
    # a decode node cannot prefill again: a preempted request is handed back instead
    recompute_on_preempt: bool = True
    block_size: int = 16
    kv_cache_bytes: int = 1 << 30
    # on an accelerator: weights + KV pool take this share of device memory (overrides kv_cache_bytes)
    gpu_memory_utilization: float | None = None
    num_kv_blocks: int | None = None  # overrides kv_cache_bytes
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    # waiting prompts join a step only while it holds fewer tokens; None: auto (fill_tokens_for)
    step_fill_tokens: int | None = None
    enable_prefix_caching: bool = True
    encoder_cache_bytes: int = 256 << 20
    seed: int = 0
    max_model_len: int = 8192
    decode_graphs: str = "auto"  # auto: on CUDA/NPU for dense models | off | eager (static path, no capture)


# one core's bf16 GEMMs run at full rate from ~128 tokens (benchmarks/linear_packing.py --threads 1)
CPU_FILL_TOKENS = 256


def fill_tokens_for(cfg: EngineConfig, device_type: str) -> int:
    """What a step fills to before it stops admitting prompts (0: the whole budget). Auto: on CPU
    a prefill node takes prompts about one at a time, so each leaves for decode as soon as it is
    done instead of when the last of a large batch is."""
    if cfg.step_fill_tokens is not None:
        return cfg.step_fill_tokens
    return CPU_FILL_TOKENS if device_type == "cpu" and cfg.finish_after_prefill else 0

"""The KV region of one instance: [layers, 2 (K/V), blocks, kv_heads, block_size, head_dim].

Heads sit above tokens inside a block so that any run of heads of one block is one contiguous
range: a decode rank of another tensor-parallel size reads its heads as one slice per block
(docs/ARCHITECTURE.md, "KV layout")."""
import logging

import torch

from qwenvl_pd.model_config import TextConfig


def allocate_kv_cache(cfg: TextConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                      device: torch.device | str = "cpu", kv_heads: int | None = None) -> torch.Tensor:
    """kv_heads: this rank's share under tensor parallelism (all of them by default)."""
    return torch.zeros(cfg.num_layers, 2, num_blocks, kv_heads or cfg.num_kv_heads, block_size,
                       cfg.head_dim, dtype=dtype, device=device)


log = logging.getLogger(__name__)


def kv_budget_bytes(kv_cache_bytes: int, utilization: float | None, device: torch.device) -> int:
    """vLLM's --gpu-memory-utilization: on an accelerator, that share of the device's memory less
    what this process holds there already (the weights) is the KV pool; on CPU kv_cache_bytes."""
    if utilization is None:
        return kv_cache_bytes
    if device.type == "cpu":
        log.warning("--gpu-memory-utilization has no effect on CPU: --kv-cache-gib sizes the KV pool")
        return kv_cache_bytes
    api = getattr(torch, device.type)  # torch.cuda, torch.npu
    total, held = api.get_device_properties(device).total_memory, api.memory_allocated(device)
    return utilization_budget(total, held, utilization)


def utilization_budget(total: int, held: int, utilization: float) -> int:
    budget = int(utilization * total) - held
    if budget <= 0:
        raise ValueError(f"--gpu-memory-utilization {utilization:g} of {total / 2**30:.1f} GiB leaves no "
                         f"room for the KV cache beside the {held / 2**30:.1f} GiB this instance holds")
    return budget


def blocks_for_memory(cfg: TextConfig, block_size: int, dtype: torch.dtype, budget_bytes: int,
                      kv_heads: int | None = None) -> int:
    """Blocks a per-rank budget holds: every rank has the same count, each of its own heads."""
    heads = kv_heads or cfg.num_kv_heads
    per_block = cfg.num_layers * 2 * block_size * heads * cfg.head_dim * dtype.itemsize
    return max(1, budget_bytes // per_block)

"""The KV region of one instance: [layers, 2 (K/V), blocks, kv_heads, block_size, head_dim].

Heads sit above tokens inside a block so that any run of heads of one block is one contiguous
range: a decode rank of another tensor-parallel size reads its heads as one slice per block
(docs/ARCHITECTURE.md, "KV layout")."""
import torch

from qwenvl_pd.config import TextConfig


def allocate_kv_cache(cfg: TextConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                      device: torch.device | str = "cpu", kv_heads: int | None = None) -> torch.Tensor:
    """kv_heads: this rank's share under tensor parallelism (all of them by default)."""
    return torch.zeros(cfg.num_layers, 2, num_blocks, kv_heads or cfg.num_kv_heads, block_size,
                       cfg.head_dim, dtype=dtype, device=device)


def blocks_for_memory(cfg: TextConfig, block_size: int, dtype: torch.dtype, budget_bytes: int,
                      kv_heads: int | None = None) -> int:
    """Blocks a per-rank budget holds: every rank has the same count, each of its own heads."""
    heads = kv_heads or cfg.num_kv_heads
    per_block = cfg.num_layers * 2 * block_size * heads * cfg.head_dim * dtype.itemsize
    return max(1, budget_bytes // per_block)

"""Decode attention through torch_npu's fused paged-attention kernel (the one vLLM-Ascend runs).

The kernel reads block-major halves [blocks, block_size, kv_heads, head_dim]; our cache keeps
heads above tokens ([blocks, kv_heads, block_size, head_dim], so cross-TP transfers read a head
range of a block as one slice). The group's blocks are therefore gathered into the kernel's
layout first, one copy as the torch reference pays for its gather. Runs eagerly: under an ACL
graph the kernel's host-side context lengths would need per-replay updates, so captured steps
keep the torch reference.
"""
import torch


def npu_paged_decode(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q [rows, heads, d]; cache [2, blocks, kv_heads, block_size, d]; block_tables [rows, blocks];
    context_lens [rows] int32 on the host."""
    import torch_npu

    rows, width = block_tables.shape
    # [2, rows * width, block_size, kv_heads, d]: row i's blocks are i * width .. (i + 1) * width
    halves = cache.index_select(1, block_tables.flatten()).transpose(2, 3).contiguous()
    tables = torch.arange(rows * width, dtype=torch.int32, device=block_tables.device).view(rows, width)
    out = torch.empty_like(q)
    torch_npu._npu_paged_attention(
        query=q.contiguous(), key_cache=halves[0], value_cache=halves[1],
        num_kv_heads=cache.shape[2], num_heads=q.shape[1], scale_value=scale,
        block_table=tables, context_lens=context_lens, out=out)
    return out

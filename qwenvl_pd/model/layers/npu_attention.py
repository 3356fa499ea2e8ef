"""Decode attention through torch_npu's fused paged-attention kernel (the one vLLM-Ascend runs).

Our per-layer cache halves, [blocks, block_size, kv_heads, head_dim], are the layout the kernel
reads, so no copy or gather happens. Runs eagerly: under an ACL graph the kernel's host-side
context lengths would need per-replay updates, so captured steps keep the torch reference.
"""
import torch


def npu_paged_decode(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q [rows, heads, d]; block_tables [rows, blocks]; context_lens [rows] int32 on the host."""
    import torch_npu

    out = torch.empty_like(q)
    torch_npu._npu_paged_attention(
        query=q.contiguous(), key_cache=cache[0], value_cache=cache[1],
        num_kv_heads=cache.shape[-2], num_heads=q.shape[1], scale_value=scale,
        block_table=block_tables.to(torch.int32), context_lens=context_lens, out=out)
    return out

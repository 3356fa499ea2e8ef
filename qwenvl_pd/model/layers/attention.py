"""Attention over a paged KV cache.

The cache of one layer is [2, num_blocks, block_size, kv_heads, head_dim]; a token's slot is
block_id * block_size + offset. One forward holds prefill chunks and decode tokens of many
sequences, flattened along the token axis.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor     # [T] where each new token's K/V is written
    query_start_loc: torch.Tensor  # [B+1] offsets of each sequence's tokens in the flat batch
    seq_lens: torch.Tensor         # [B] context length after this step, new tokens included
    block_tables: torch.Tensor     # [B, max_blocks] block ids, padded with 0
    max_query_len: int
    max_seq_len: int
    query_lens_host: tuple[int, ...] = ()  # [B] on the host, to split without a device sync


def write_kv(cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """k, v [T, kv_heads, head_dim] into cache [2, blocks, block_size, kv_heads, head_dim]."""
    flat = cache.view(2, -1, *cache.shape[-2:])
    flat[0].index_copy_(0, slots, k)
    flat[1].index_copy_(0, slots, v)


def paged_attention(q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float) -> torch.Tensor:
    """q [T, heads, head_dim] -> [T, heads, head_dim]; the reference implementation for every device."""
    batch = meta.seq_lens.shape[0]
    block_size = cache.shape[2]
    n_blocks = (meta.max_seq_len + block_size - 1) // block_size
    tables = meta.block_tables[:, :n_blocks]
    # [B, ctx, kv_heads, head_dim], ctx = n_blocks * block_size
    k = cache[0][tables].flatten(1, 2)
    v = cache[1][tables].flatten(1, 2)
    qp, token_index = _pad_queries(q, meta, batch)  # [B, max_q, heads, head_dim]
    mask = _causal_mask(meta, k.shape[1], qp.shape[1])  # [B, 1, max_q, ctx]
    out = F.scaled_dot_product_attention(
        qp.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(1, 2).reshape(-1, *q.shape[1:])[token_index]


def _pad_queries(q: torch.Tensor, meta: AttentionMetadata, batch: int):
    starts = meta.query_start_loc[:-1]
    q_lens = meta.query_start_loc[1:] - starts
    seq_of = torch.repeat_interleave(torch.arange(batch, device=q.device), q_lens)  # [T]
    offset = torch.arange(q.shape[0], device=q.device) - starts[seq_of]
    padded = q.new_zeros(batch, meta.max_query_len, *q.shape[1:])
    padded[seq_of, offset] = q
    return padded, seq_of * meta.max_query_len + offset


def _causal_mask(meta: AttentionMetadata, ctx: int, max_q: int) -> torch.Tensor:
    q_lens = meta.query_start_loc[1:] - meta.query_start_loc[:-1]
    # absolute position of each padded query row: the new tokens are the last q_len of the context
    q_pos = (meta.seq_lens - q_lens)[:, None] + torch.arange(max_q, device=q_lens.device)  # [B, max_q]
    k_pos = torch.arange(ctx, device=q_lens.device)
    mask = k_pos[None, None, :] <= q_pos[:, :, None]  # [B, max_q, ctx]
    mask &= k_pos[None, None, :] < meta.seq_lens[:, None, None]
    # padded query rows would see nothing and give NaN; let them see key 0, their output is dropped
    mask[:, :, 0] = True
    return mask[:, None]

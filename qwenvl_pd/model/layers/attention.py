"""Attention over a paged KV cache.

The cache of one layer is [2, num_blocks, kv_heads, block_size, head_dim] (heads above tokens,
so a head range of a block is contiguous for cross-TP transfers); a token's slot is
block_id * block_size + offset. One forward holds prefill chunks and decode tokens of many
sequences, flattened along the token axis, single-token (decode) chunks first.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qwenvl_pd.model.layers import cpu_paged, cpu_prefill
from qwenvl_pd.model.layers.npu_attention import npu_paged_decode


@dataclass
class PrefillSpan:
    start: int                 # first token of the chunk in the flat batch
    end: int
    context_len: int           # keys after this step, the chunk's own tokens included
    block_table: torch.Tensor  # [blocks] of this sequence


@dataclass
class DecodeGroup:
    """Decode rows that attend together: padded to the longest of the group, so the runner groups
    rows of similar context length."""
    start: int                 # first row of the group in the flat batch
    end: int
    block_tables: torch.Tensor  # [rows, blocks] block ids, padded with 0
    key_mask: torch.Tensor      # [rows, 1, 1, blocks*block_size] True = attend
    # [rows] int32 on the host, keys per row: set where torch_npu's fused kernel is to run
    context_lens: torch.Tensor | None = None
    # [rows] int64 keys per row, on the device: lets the CPU kernel read the cache in place
    lens: torch.Tensor | None = None


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor       # [T] where each new token's K/V is written
    num_decode: int                  # the first num_decode tokens are single-token chunks
    decode_groups: list[DecodeGroup]  # cover rows [0, num_decode)
    prefills: list[PrefillSpan]      # the multi-token chunks, after the decode tokens
    # flat scratch that block gathers copy into, large enough for the biggest group or span; a
    # fresh multi-MB tensor per gather costs page faults on CPU (measured 5.3 vs 3.4 ms a layer)
    gather_buffer: torch.Tensor | None = None


def write_kv(cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """k, v [T, kv_heads, head_dim] into cache [2, blocks, kv_heads, block_size, head_dim]."""
    heads, size, d = cache.shape[2:]
    # slot b * size + o of head h is row (b * heads + h) * size + o of the flat cache: [T, heads]
    base = slots // size * (heads * size) + slots % size
    rows = (base[:, None] + torch.arange(0, heads * size, size, device=slots.device)).flatten()
    flat = cache.view(2, -1, d)
    flat[0].index_copy_(0, rows, k.reshape(-1, d))
    flat[1].index_copy_(0, rows, v.reshape(-1, d))


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q [T, heads, d], this step's k, v [T, kv_heads, d] (already in the cache) -> [T, heads, d].
    Torch reference on every device; decode groups with context_lens go to torch_npu's kernel,
    those with lens on CPU to cpu_paged's, which reads the cache in place; bf16 prefill chunks on
    CPU to cpu_prefill's."""
    out = torch.empty_like(q)
    buffer = meta.gather_buffer
    for group in meta.decode_groups:
        s, e = group.start, group.end
        out[s:e] = _decode(q[s:e], cache, group, scale, buffer)
    for span in meta.prefills:
        s, e = span.start, span.end
        out[s:e] = _prefill(q[s:e], k[s:e], v[s:e], cache, span, scale, buffer)
    return out


def _decode(q: torch.Tensor, cache: torch.Tensor, group: DecodeGroup, scale: float,
            buffer: torch.Tensor | None):
    if group.context_lens is not None:
        return npu_paged_decode(q, cache, group.block_tables, group.context_lens, scale)
    if group.lens is not None and cpu_paged.supports(q, cache):
        out = torch.empty(q.shape, dtype=q.dtype)  # rows, heads, d: the strides the kernel writes
        if cpu_paged.paged_decode(q, cache, group.block_tables, group.lens, scale, out):
            return out
    rows, kv_heads, d = group.block_tables.shape[0], cache.shape[2], cache.shape[-1]
    gathered = _gather(cache, group.block_tables.flatten(), buffer).view(2, kv_heads, rows, -1, d)
    keys, values = gathered.transpose(1, 2)  # [D, kv_heads, ctx, d] each
    # the heads sharing a KV head act as that head's query rows, so each K/V is read once;
    # enable_gqa expands K/V per head instead (measured 2x slower on CPU)
    out = F.scaled_dot_product_attention(
        q.view(rows, kv_heads, -1, d), keys, values,
        attn_mask=group.key_mask, scale=scale)  # [D, kv_heads, heads per KV head, d]
    return out.view(q.shape)


def _gather(cache: torch.Tensor, block_ids: torch.Tensor, buffer: torch.Tensor | None) -> torch.Tensor:
    """-> [2, kv_heads, len(block_ids), block_size, d]: head-major, so a head's keys are one run.
    One index_select copies whole per-head blocks, 2-3x faster on CPU than advanced indexing."""
    source = cache.transpose(1, 2)  # [2, kv_heads, blocks, block_size, d], a view
    shape = (2, cache.shape[2], len(block_ids), *cache.shape[3:])
    if buffer is None or buffer.numel() < math.prod(shape):  # unsized: rows the kernel declined
        return source.index_select(2, block_ids)
    return torch.index_select(source, 2, block_ids, out=buffer[:math.prod(shape)].view(shape))


def _prefill(q, k, v, cache, span: PrefillSpan, scale: float, buffer: torch.Tensor | None):
    if cpu_prefill.supports(q) and cache.dtype == q.dtype:
        out = cpu_prefill.paged(q, cache, span.block_table, span.context_len, scale)
        if out is not None:
            return out
    n, ctx = q.shape[0], span.context_len
    if ctx == n:  # nothing cached before this chunk: its own K/V are the whole context
        keys, values, mask, causal = k.transpose(0, 1), v.transpose(0, 1), None, True
    else:  # a later chunk or a prefix-cache hit: read the earlier keys from the cache
        keys, values = _gather(cache, span.block_table, buffer).flatten(2, 3)[:, :, :ctx]
        # query i sits at position ctx - n + i and sees keys up to it
        mask = torch.arange(ctx, device=q.device)[None] <= torch.arange(ctx - n, ctx, device=q.device)[:, None]
        causal = False
    # a batch axis of 1: without one, torch's CPU SDPA takes its ~4x slower math path
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], keys[None], values[None],  # keys, values [kv_heads, ctx, d]
        attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True)  # [1, heads, n, d]
    return out[0].transpose(0, 1)

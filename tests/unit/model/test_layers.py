"""The paged attention and the packed linears against plain dense torch."""
import dataclasses
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from qwenvl_pd.model.layers.attention import (AttentionMetadata, DecodeGroup, PrefillSpan,
                                              paged_attention, write_kv)
from qwenvl_pd.model.layers.linear import AVX2_DENSE_FROM, Linear, dense_from, LinearGroup, pack_group
from qwenvl_pd.model.layers.norm import RMSNorm
from qwenvl_pd.model.layers.moe import Experts
from qwenvl_pd.platform import cpu_flags
from qwenvl_pd import LLM

BLOCK, HEADS, KV_HEADS, DIM = 4, 4, 2, 8


def _dense(q, keys, values, causal_from: int | None = None):
    """q [n, heads, d] over keys/values [ctx, kv_heads, d]; causal_from: q[0]'s position."""
    k = keys.repeat_interleave(HEADS // KV_HEADS, dim=1).transpose(0, 1)
    v = values.repeat_interleave(HEADS // KV_HEADS, dim=1).transpose(0, 1)
    scores = q.transpose(0, 1) @ k.transpose(1, 2) * DIM ** -0.5  # [heads, n, ctx]
    if causal_from is not None:
        pos = torch.arange(causal_from, causal_from + q.shape[0])
        scores = scores.masked_fill(torch.arange(keys.shape[0])[None] > pos[:, None], float("-inf"))
    return (scores.softmax(-1) @ v).transpose(0, 1)


def _group(tables: list[list[int]], lens: list[int], start: int) -> DecodeGroup:
    width = max(len(t) for t in tables)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    mask = (torch.arange(width * BLOCK)[None] < torch.tensor(lens)[:, None])[:, None, None]
    return DecodeGroup(start, start + len(tables), padded, mask)


def test_write_kv_puts_each_head_of_a_slot_in_its_block_head_row():
    cache = torch.zeros(2, 3, KV_HEADS, BLOCK, DIM)
    k = torch.arange(2 * KV_HEADS * DIM, dtype=torch.float32).view(2, KV_HEADS, DIM)
    write_kv(cache, k, -k, torch.tensor([2 * BLOCK + 3, 0 * BLOCK + 1]))  # block 2 offset 3, block 0 offset 1
    for t, (block, offset) in enumerate([(2, 3), (0, 1)]):
        for h in range(KV_HEADS):
            assert torch.equal(cache[0, block, h, offset], k[t, h])
            assert torch.equal(cache[1, block, h, offset], -k[t, h])
    assert cache.count_nonzero() == 2 * 2 * KV_HEADS * DIM - 2  # k[0, 0, 0] is 0: nothing else written


@pytest.mark.parametrize("buffered", [False, True])
def test_decode_groups_and_a_prefill_chunk_match_dense_attention(buffered):
    torch.manual_seed(0)
    cache = torch.randn(2, 12, KV_HEADS, BLOCK, DIM)
    # three decode rows with 3, 9 and 6 keys (blocks not contiguous), then a 3-token chunk
    # continuing a sequence that already has 5 keys in blocks [7, 8]
    tables, lens = [[2], [5, 0, 9], [4, 11]], [3, 9, 6]
    q = torch.randn(6, HEADS, DIM)
    k, v = torch.randn(6, KV_HEADS, DIM), torch.randn(6, KV_HEADS, DIM)
    slots = torch.tensor([2 * BLOCK + 2, 9 * BLOCK + 0, 11 * BLOCK + 1,
                          8 * BLOCK + 1, 8 * BLOCK + 2, 8 * BLOCK + 3])
    write_kv(cache, k, v, slots)
    meta = AttentionMetadata(slots, 3, [_group(tables[:1], lens[:1], 0), _group(tables[1:], lens[1:], 1)],
                             [PrefillSpan(3, 6, 8, torch.tensor([7, 8]))])
    if buffered:  # stale values in the scratch must never leak into a result
        meta.gather_buffer = torch.full((2 * 2 * 3 * BLOCK * KV_HEADS * DIM,), float("nan"))
    out = paged_attention(q, k, v, cache, meta, DIM ** -0.5)

    def keys_of(blocks, n):
        # [blocks, kv_heads, BLOCK, DIM] -> [keys, kv_heads, DIM]
        return (cache[0][blocks].transpose(1, 2).flatten(0, 1)[:n],
                cache[1][blocks].transpose(1, 2).flatten(0, 1)[:n])

    for row, (blocks, n) in enumerate(zip(tables, lens)):
        expected = _dense(q[row:row + 1], *keys_of(blocks, n))
        torch.testing.assert_close(out[row:row + 1], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[3:], _dense(q[3:], *keys_of([7, 8], 8), causal_from=5),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tokens", [1, 7, 300])  # 300: past AVX2_DENSE_FROM (unpacked there)
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_f_linear(tokens, bias):
    torch.manual_seed(tokens)
    layer = Linear(64, 48, bias=bias)
    x = torch.randn(tokens, 64)
    expected = F.linear(x, layer.weight, layer.bias)
    layer.pack()
    assert layer.packed is not None and layer.packed.weight.is_mkldnn
    assert layer.weight is None and layer.bias is None  # the dense copy is gone
    out = layer(x)
    assert out.shape == (tokens, 48)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # AVX2 unpacks past 256 tokens; with AVX-512 every size runs the packed GEMM
    unpacks = "avx512f" not in cpu_flags() and tokens > AVX2_DENSE_FROM
    assert dense_from() == (None if "avx512f" in cpu_flags() else AVX2_DENSE_FROM)
    w, b = layer.packed.weight, layer.packed.bias
    same = F.linear(x, w.to_dense(), b) if unpacks else torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    assert torch.equal(out, same)


@pytest.mark.skipif(not {"avx512_bf16", "amx_bf16"} & cpu_flags(), reason="no native bf16 on this CPU")
@pytest.mark.parametrize("tokens", [8, 300])
def test_bf16_linears_pack_where_the_cpu_computes_bf16(tokens):
    torch.manual_seed(tokens)
    layer = Linear(64, 48, bias=False).to(torch.bfloat16)
    x = torch.randn(tokens, 64, dtype=torch.bfloat16)
    expected = F.linear(x, layer.weight)
    layer.pack()
    assert layer.packed is not None and layer.packed.weight.dtype == torch.bfloat16
    torch.testing.assert_close(layer(x), expected, rtol=1e-2, atol=1e-2)


def test_a_prefill_engine_packs_as_a_decoding_one(tiny_dirs):
    """PD's tokens equal colocated's only if both sides run the same GEMM paths; MoE experts are
    transposed on every role (x @ w on the released layout is slow in bf16)."""
    prefill = LLM(model=str(tiny_dirs["qwen3_vl_moe"]), max_model_len=256, finish_after_prefill=True)
    assert prefill.model.lm_head.packed is not None
    experts = next(m for m in prefill.model.modules() if isinstance(m, Experts))
    assert experts.linear_layout and experts.gate_up_proj.shape == (8, 96, 128)


def test_packed_group_splits_one_gemm_into_each_linears_output():
    torch.manual_seed(2)
    q, k, v = Linear(32, 24), Linear(32, 8), Linear(32, 8)
    x = torch.randn(2, 3, 32)  # leading dimensions are kept
    expected = [F.linear(x, lin.weight, lin.bias) for lin in (q, k, v)]
    outs = pack_group(LinearGroup(q, k, v))(x)
    assert [tuple(o.shape) for o in outs] == [(2, 3, 24), (2, 3, 8), (2, 3, 8)]
    for want, out in zip(expected, outs):
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_packing_a_tied_lm_head_leaves_the_embedding_in_place():
    embed, head = torch.nn.Embedding(40, 16), Linear(16, 40, bias=False)
    head.weight = embed.weight
    x = torch.randn(3, 16)
    expected = F.linear(x, embed.weight)
    head.pack()
    assert head.weight is None and embed.weight.shape == (40, 16)
    torch.testing.assert_close(head(x), expected, rtol=1e-5, atol=1e-5)


def test_packing_skips_what_onednn_does_not_run_here():
    layer = Linear(16, 8).to(torch.float16)
    layer.pack()
    group = LinearGroup(layer)
    assert layer.packed is None and pack_group(group) is group  # left as it was: not packed
    x = torch.randn(3, 16, dtype=torch.float16)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


class _StandInTorchNpu(types.ModuleType):
    """torch_npu's _npu_paged_attention as documented (dense per row); records its arguments."""

    def __init__(self):
        super().__init__("torch_npu")
        self.calls = []

    def _npu_paged_attention(self, *, query, key_cache, value_cache, num_kv_heads, num_heads,
                             scale_value, block_table, context_lens, out):
        self.calls.append((block_table.dtype, context_lens.dtype, context_lens.device.type,
                           num_kv_heads, num_heads, key_cache.shape))
        for row, (blocks, n) in enumerate(zip(block_table.tolist(), context_lens.tolist())):
            keys = key_cache[blocks].flatten(0, 1)[:n]
            values = value_cache[blocks].flatten(0, 1)[:n]
            out[row] = _dense(query[row:row + 1], keys, values)[0]


def test_decode_group_with_context_lens_runs_the_fused_npu_kernel(monkeypatch):
    stand_in = _StandInTorchNpu()
    monkeypatch.setitem(sys.modules, "torch_npu", stand_in)
    torch.manual_seed(2)
    cache = torch.randn(2, 6, KV_HEADS, BLOCK, DIM)
    q = torch.randn(2, HEADS, DIM)
    group = _group([[3, 1], [5]], [7, 2], 0)
    fused = dataclasses.replace(group, context_lens=torch.tensor([7, 2], dtype=torch.int32))
    meta = AttentionMetadata(torch.zeros(2, dtype=torch.long), 2, [fused], [])
    out = paged_attention(q, q[:, :KV_HEADS], q[:, :KV_HEADS], cache, meta, DIM ** -0.5)
    assert stand_in.calls == [(torch.int32, torch.int32, "cpu", KV_HEADS, HEADS,
                               (4, BLOCK, KV_HEADS, DIM))]  # the 2 x 2 table's blocks, re-laid
    reference = paged_attention(q, q[:, :KV_HEADS], q[:, :KV_HEADS], cache,
                                AttentionMetadata(meta.slot_mapping, 2, [group], []), DIM ** -0.5)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_equals_the_reference_formula_exactly(dtype):
    torch.manual_seed(0)
    norm = RMSNorm(64, 1e-6)
    norm.weight.data = torch.randn(64).to(dtype)
    x = (torch.randn(3, 5, 64) * 10).to(dtype)
    # Hugging Face's Qwen2RMSNorm: float32 statistics, weight applied after the cast back
    h = x.float()
    expected = norm.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
    assert torch.equal(norm(x), expected)

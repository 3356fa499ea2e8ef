"""The bf16 CPU prefill/vision attention kernel against float32 SDPA (the oracle): within the
noise torch's own bf16 SDPA makes, exactly blind to what it must not see."""
import pytest
import torch
import torch.nn.functional as F

from qwenvl_pd.model.layers import cpu_prefill
from qwenvl_pd.model.layers.attention import AttentionMetadata, PrefillSpan, paged_attention

pytestmark = [pytest.mark.skipif(not cpu_prefill.supports(torch.zeros(1, dtype=torch.bfloat16)),
                                 reason="no C compiler or no bf16 dot instruction here"),
              pytest.mark.usefixtures("default_threads")]  # the kernel's threaded path
BF16 = torch.bfloat16


def _paged(n: int, ctx: int, heads: int, kv_heads: int, dim: int, block: int = 16, seed: int = 0):
    """q [n, heads, dim], a cache of shuffled blocks (3 unused), the table of the ctx keys."""
    gen = torch.Generator().manual_seed(seed)
    need = -(-ctx // block)
    cache = torch.randn(2, need + 3, kv_heads, block, dim, generator=gen).to(BF16)
    table = torch.randperm(need + 3, generator=gen)[:need].to(torch.int32)
    return torch.randn(n, heads, dim, generator=gen).to(BF16), cache, table


def _reference(q, cache, table, ctx, dtype):
    keys = cache.transpose(1, 2)[:, :, table.long()].flatten(2, 3)[:, :, :ctx].to(dtype)
    n = q.shape[0]
    mask = torch.arange(ctx)[None] <= torch.arange(ctx - n, ctx)[:, None]
    out = F.scaled_dot_product_attention(q.to(dtype).transpose(0, 1)[None], keys[0][None],
                                         keys[1][None], attn_mask=mask, enable_gqa=True)
    return out[0].transpose(0, 1)


@pytest.mark.parametrize("n,ctx,heads,kv_heads,dim", [
    (5, 5, 8, 2, 128),      # a short first chunk
    (300, 300, 8, 2, 128),  # several query blocks, ctx not a multiple of the key block
    (37, 203, 4, 1, 80),    # a later chunk over cached context; dim not a multiple of 16
    (64, 64, 6, 6, 72),     # no grouping (the vision towers' case)
])
def test_causal_chunks_match_sdpa_within_bf16_noise(n, ctx, heads, kv_heads, dim):
    q, cache, table = _paged(n, ctx, heads, kv_heads, dim)
    exact = _reference(q, cache, table, ctx, torch.float32)
    ours = cpu_prefill.paged(q, cache, table, ctx, dim ** -0.5)
    torch_bf16 = _reference(q, cache, table, ctx, BF16)
    assert ours.shape == (n, heads, dim) and ours.dtype == BF16
    assert (ours.float() - exact).abs().max() <= 2 * (torch_bf16.float() - exact).abs().max() + 1e-3


def test_keys_after_a_query_and_blocks_outside_the_table_change_nothing():
    q, cache, table = _paged(40, 100, 8, 2, 64)
    before = cpu_prefill.paged(q, cache, table, 100, 0.125)
    cache[:, table[-1].long(), :, 100 % 16:] = 1e4  # the last block's unused slots
    unused = [b for b in range(cache.shape[1]) if b not in set(table.tolist())]
    cache[:, unused] = -1e4
    assert torch.equal(cpu_prefill.paged(q, cache, table, 100, 0.125), before)
    # the first query (position 60) must not see key 61 onwards: only later rows may change
    q2, c2, t2 = _paged(40, 100, 8, 2, 64)
    c2[:, t2[61 // 16].long(), :, 61 % 16] = 50.0
    assert torch.equal(cpu_prefill.paged(q2, c2, t2, 100, 0.125)[0], before[0])
    assert not torch.equal(cpu_prefill.paged(q2, c2, t2, 100, 0.125)[1], before[1])


def test_dense_attention_reads_strided_views_as_the_towers_pass_them():
    qkv = torch.randn(100, 3, 8, 64, generator=torch.Generator().manual_seed(1)).to(BF16)
    q, k, v = qkv.permute(1, 2, 0, 3).unbind(0)  # [heads, n, d] views with the qkv row stride
    exact = F.scaled_dot_product_attention(q.float()[None], k.float()[None], v.float()[None])
    torch_bf16 = F.scaled_dot_product_attention(q[None], k[None], v[None])
    ours = cpu_prefill.dense(q, k, v, 64 ** -0.5)
    err = (ours.float() - exact[0].transpose(0, 1)).abs().max()
    assert err <= 2 * (torch_bf16.float() - exact).abs().max() + 1e-3


def test_float32_and_shapes_it_cannot_take_are_declined():
    assert not cpu_prefill.supports(torch.zeros(1))
    q, cache, table = _paged(4, 4, 6, 4, 32)  # 6 heads over 4 KV heads: no whole groups
    assert cpu_prefill.paged(q, cache, table, 4, 0.2) is None


def test_bf16_prefill_spans_take_the_kernel_and_agree_with_the_torch_path(monkeypatch):
    q, cache, table = _paged(30, 70, 8, 2, 64)
    span = PrefillSpan(0, 30, 70, table)
    meta = AttentionMetadata(torch.zeros(0, dtype=torch.long), 0, [], [span])
    kernel = paged_attention(q, q[:, :2], q[:, :2], cache, meta, 0.125)
    monkeypatch.setenv("QWENVL_PD_CPU_KERNEL", "0")
    reference = paged_attention(q, q[:, :2], q[:, :2], cache, meta, 0.125)
    assert torch.equal(kernel, cpu_prefill.paged(q, cache, table, 70, 0.125))
    assert not torch.equal(kernel, reference)
    assert (kernel.float() - reference.float()).abs().max() < 2e-2

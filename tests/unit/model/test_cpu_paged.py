"""The CPU kernel that reads the paged KV cache in place against the torch reference (gather +
SDPA), the oracle: same random caches, same block tables."""
import pytest
import torch

from qwenvl_pd.model.layers import cpu_paged
from qwenvl_pd.model.layers.attention import AttentionMetadata, DecodeGroup, paged_attention

pytestmark = [pytest.mark.skipif(not cpu_paged.available(), reason="no C compiler here"),
              pytest.mark.usefixtures("default_threads")]  # the kernel's threaded path
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}


def _case(lens: list[int], heads: int, kv_heads: int, dim: int, block: int, dtype, seed: int):
    """A cache of shuffled blocks, q [rows, heads, dim], and a group over a slice of a wider table
    (so its rows are strided, as the runner's persistent table is)."""
    gen = torch.Generator().manual_seed(seed)
    need = [-(-n // block) for n in lens]
    num_blocks = sum(need) + 3
    cache = torch.randn(2, num_blocks, kv_heads, block, dim, generator=gen).to(dtype)
    order = torch.randperm(num_blocks, generator=gen)
    width = max(need)
    table = torch.zeros(len(lens), width + 5, dtype=torch.long)  # 5 unused columns
    at = 0
    for row, n in enumerate(need):
        table[row, :n] = order[at:at + n]
        at += n
    mask = (torch.arange(width * block)[None] < torch.tensor(lens)[:, None])[:, None, None]
    q = torch.randn(len(lens), heads, dim, generator=gen).to(dtype)
    return q, cache, table[:, :width], mask


def _attend(q, cache, tables, mask, lens: torch.Tensor | None) -> torch.Tensor:
    group = DecodeGroup(0, q.shape[0], tables, mask, lens=lens)
    meta = AttentionMetadata(torch.zeros(0, dtype=torch.long), q.shape[0], [group], [])
    kv = torch.zeros(q.shape[0], cache.shape[2], q.shape[2], dtype=q.dtype)
    return paged_attention(q, kv, kv, cache, meta, q.shape[2] ** -0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,dim,block", [(8, 2, 128, 16), (4, 4, 32, 4), (7, 1, 40, 16)])
def test_kernel_equals_the_reference_on_random_paged_caches(dtype, heads, kv_heads, dim, block):
    # one key, a partial block, past one 128-key chunk, a chunk boundary exactly, and a long row
    lens = [1, 5, 129, 256, 700, 37]
    q, cache, tables, mask = _case(lens, heads, kv_heads, dim, block, dtype, seed=dim)
    expected = _attend(q, cache, tables, mask, lens=None)
    out = _attend(q, cache, tables, mask, lens=torch.tensor(lens))
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out, expected, **TOLERANCE[dtype])


# bf16 on AVX512-BF16 scores keys in tiles of 16 and reads 32 dims at a time: 1-8 heads per KV
# head, head_dim a multiple of 32 or not (80), up to the largest (256), blocks that tiles cross (5)
@pytest.mark.parametrize("heads,kv_heads,dim,block",
                         [(16, 2, 64, 16), (4, 2, 128, 32), (2, 2, 64, 5), (8, 1, 80, 16),
                          (4, 1, 256, 16)])
def test_bf16_tiles_equal_the_reference(heads, kv_heads, dim, block):
    lens = [15, 16, 17, 31, 147, 300]  # short and full tiles, partial blocks, past a 256-key span
    q, cache, tables, mask = _case(lens, heads, kv_heads, dim, block, torch.bfloat16, seed=block)
    out = _attend(q, cache, tables, mask, lens=torch.tensor(lens))
    torch.testing.assert_close(out, _attend(q, cache, tables, mask, lens=None),
                               **TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_ignores_keys_past_each_rows_length(dtype):
    q, cache, tables, mask = _case([20, 3], 4, 2, 32, 16, dtype, seed=1)
    before = _attend(q, cache, tables, mask, torch.tensor([20, 3]))
    cache[:, tables[1, 0], :, 3:] = float("nan")  # beyond row 1's three keys
    cache[:, tables[0, 1], :, 4:] = float("nan")  # beyond row 0's twenty
    assert torch.equal(_attend(q, cache, tables, mask, torch.tensor([20, 3])), before)


def test_shapes_past_the_kernels_buffers_fall_back_to_the_reference():
    # 32 heads on one KV head exceed the kernel's 16-head group: the reference answers
    q, cache, tables, mask = _case([9, 30], 32, 1, 16, 4, torch.float32, seed=2)
    out = torch.full_like(q, 7.0)
    assert not cpu_paged.paged_decode(q, cache, tables, torch.tensor([9, 30]), 0.25, out)
    assert torch.equal(out, torch.full_like(q, 7.0))  # untouched
    torch.testing.assert_close(_attend(q, cache, tables, mask, torch.tensor([9, 30])),
                               _attend(q, cache, tables, mask, None), rtol=1e-5, atol=1e-6)

"""The bf16 dot kernel (csrc/bf16_linear.c) behind packed bf16 linears on AVX512-BF16 CPUs.

Inputs are small integers, so every float32 sum is exact whatever the order of the additions
and the kernel's output must equal F.linear's bit for bit."""
import pytest
import torch
import torch.nn.functional as F

from qwenvl_pd.model.layers import bf16_linear
from qwenvl_pd.model.layers.linear import Linear, LinearGroup, pack_group

pytestmark = pytest.mark.skipif(not bf16_linear.available(), reason="no AVX512-BF16 kernel here")


def integers(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-4, 5, shape, generator=g).to(torch.bfloat16)


@pytest.mark.parametrize("m", [1, 3, 8, 13, 35])  # tiles of 8 rows, then 4 + 2 + 1
@pytest.mark.parametrize("n", [32, 40, 100])       # whole and partial 32-column tiles
def test_equals_f_linear_bit_for_bit(m, n):
    x, w = integers(m, 66, seed=m), integers(n, 66, seed=n)
    out = bf16_linear.linear(x, bf16_linear.pack(w), n, None)
    assert out.shape == (m, n) and torch.equal(out, F.linear(x, w))


def test_bias_is_added_before_rounding_and_strided_rows_are_read_in_place():
    x = integers(5, 128, seed=1)[:, :64]  # rows 128 apart
    w, b = integers(48, 64, seed=2), integers(48, seed=3)
    out = bf16_linear.linear(x, bf16_linear.pack(w), 48, b.float())
    assert torch.equal(out, F.linear(x, w, b))


def test_pack_pads_columns_with_zeros_and_unpack_inverts_it():
    w = integers(40, 6, seed=4)
    packed = bf16_linear.pack(w)
    assert packed.shape == (2, 3, 32, 2)  # [tiles, in / 2, 32, 2]
    assert torch.equal(packed[0, 1, 5], w[5, 2:4]) and torch.equal(packed[1, 2, 7], w[39, 4:6])
    assert not packed[1, :, 8:].any()  # columns 40..63 do not exist
    assert torch.equal(bf16_linear.unpack(packed, 40), w)


def test_two_threads_give_what_one_gives():
    x, w = integers(9, 256, seed=5), integers(300, 256, seed=6)
    packed, before = bf16_linear.pack(w), torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = bf16_linear.linear(x, packed, 300, None)
        torch.set_num_threads(2)
        two = bf16_linear.linear(x, packed, 300, None)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two) and torch.equal(one, F.linear(x, w))


def test_an_odd_input_size_is_declined_and_packing_keeps_onednn_for_it():
    x, w = integers(2, 7, seed=7), integers(16, 7, seed=8)
    assert bf16_linear.linear(x, torch.zeros(1, 3, 32, 2, dtype=torch.bfloat16), 16, None) is None
    layer = Linear(7, 16, bias=False).to(torch.bfloat16)
    layer.weight.data.copy_(w)
    layer.pack()
    assert not layer.packed.dot and layer.packed.weight.is_mkldnn
    assert torch.equal(layer(x), F.linear(x, w))


def test_a_packed_bf16_group_runs_the_kernel_and_splits_its_output():
    q, k = Linear(64, 24, bias=True).bfloat16(), Linear(64, 8, bias=True).bfloat16()
    for i, lin in enumerate((q, k)):
        lin.weight.data.copy_(integers(*lin.weight.shape, seed=10 + i))
        lin.bias.data.copy_(integers(*lin.bias.shape, seed=20 + i))
    x = integers(2, 3, 64, seed=9)
    expected = [F.linear(x, lin.weight, lin.bias) for lin in (q, k)]
    group = pack_group(LinearGroup(q, k))
    assert group.dot and group.dense().shape == (32, 64)
    outs = group(x)
    assert [tuple(o.shape) for o in outs] == [(2, 3, 24), (2, 3, 8)]
    assert all(torch.equal(o, e) for o, e in zip(outs, expected))

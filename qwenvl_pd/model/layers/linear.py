"""nn.Linear, plus one-time weight packing on CPU (fused where inputs are shared): float32 for
oneDNN, bf16 for the bf16 dot kernel (csrc/bf16_linear.c) where the processor has it."""
import functools

import torch
import torch.nn.functional as F
from torch import nn

from qwenvl_pd.model.layers import bf16_linear
from qwenvl_pd.model.parallel import TensorParallel, all_reduce, shard

# oneDNN picks its blocked weight layout for this many rows. Measured on 2 AVX2 cores
# (benchmarks/linear_packing.py), the packed GEMM beats F.linear 1.3-3.4x from 8 to 32 tokens
# (the lm_head at 19: 62 ms against 149 ms) but loses ~10% from 512 tokens up, so there the
# weight is unpacked again for calls past AVX2_DENSE_FROM tokens (to_dense, exact). With AVX-512
# the packed GEMM keeps up at every size (1 core, bf16 and float32, 256-2048 tokens: 0.95-0.87x
# of F.linear's time), while to_dense costs 2-5 ms per MLP weight per call: 10-15% of a
# 256-token prefill step.
PACK_HINT = 32
AVX2_DENSE_FROM = 256


def can_pack(weight: torch.Tensor) -> bool:
    """bf16 too on AVX512-BF16/AMX (benchmarks/linear_packing.py --dtype bfloat16, 2 cores: 1.5-2.5x
    at 8 tokens, 1.35-1.5x at 32, the lm_head 26.7 -> 13.1 ms at 8); every role packs alike: PD's
    tokens must equal colocated's."""
    native = weight.dtype == torch.float32 or (weight.dtype == torch.bfloat16 and _native_bf16())
    return weight.device.type == "cpu" and native and torch.backends.mkldnn.is_available()


@functools.cache
def dense_from() -> int | None:
    """Tokens past which a packed linear unpacks its weight for the call; None: never."""
    from qwenvl_pd.platform import cpu_flags
    return None if "avx512f" in cpu_flags() else AVX2_DENSE_FROM


@functools.cache
def _native_bf16() -> bool:
    from qwenvl_pd.platform import CPU_NATIVE, cpu_flags
    return bool(set(CPU_NATIVE["bfloat16"]) & cpu_flags())


class PackedWeights:
    """The weights of linears that read the same input, concatenated on the output axis and
    reordered once for the CPU: one GEMM then serves q/k/v or gate/up. bf16 goes to the dot
    kernel's tiles where the CPU has the instruction (decode's few rows: 1.4x oneDNN's blocked
    layout over a whole step, prefill sizes alike, benchmarks/linear_packing.py), the rest to
    oneDNN's blocked layout. The linears drop their dense parameters, so packing does not double
    the weights' memory (a weight shared with another module, the tied lm_head's, lives on there)."""

    def __init__(self, *linears: nn.Linear):
        weight = torch.cat([lin.weight.detach() for lin in linears])  # [sum(out), in]
        biases = [lin.bias for lin in linears]
        self.bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
        self.sizes = [lin.out_features for lin in linears]
        self.dot = _dot_kernel(weight)
        if self.dot:
            self.weight = bf16_linear.pack(weight)  # [tiles, in / 2, 32, 2]
            self.bias = None if self.bias is None else self.bias.float()
        else:
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_HINT)
        self.dense_from = dense_from()
        for lin in linears:
            lin.weight = lin.bias = None

    def dense(self) -> torch.Tensor:
        """The concatenated weight as F.linear takes it: [sum(out), in]."""
        return bf16_linear.unpack(self.weight, sum(self.sizes)) if self.dot else self.weight.to_dense()

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x [..., in] -> one [..., out_i] view per linear."""
        out = self._gemm(x.reshape(-1, x.shape[-1]))
        return out.view(*x.shape[:-1], out.shape[-1]).split(self.sizes, dim=-1)

    def _gemm(self, flat: torch.Tensor) -> torch.Tensor:
        if self.dot:
            return bf16_linear.linear(flat, self.weight, sum(self.sizes), self.bias)
        if self.dense_from is not None and flat.shape[0] > self.dense_from:
            return F.linear(flat, self.weight.to_dense(), self.bias)
        return torch.ops.mkldnn._linear_pointwise(flat, self.weight, self.bias, "none", [], "")


def _dot_kernel(weight: torch.Tensor) -> bool:
    return (weight.dtype == torch.bfloat16 and weight.shape[1] % 2 == 0
            and bf16_linear.available())


class Linear(nn.Linear):
    packed: PackedWeights | None = None

    def pack(self) -> None:
        if can_pack(self.weight):
            self.packed = PackedWeights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        return self.packed(x)[0]


class RowLinear(Linear):
    """Input features split over the ranks: each computes a partial sum, one all-reduce adds
    them (o_proj, down_proj)."""

    def __init__(self, in_features: int, out_features: int, tp: TensorParallel):
        start, stop = tp.split(in_features)
        super().__init__(stop - start, out_features, bias=False)
        shard(self.weight, 1, in_features, (start, stop))
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(super().forward(x), self.tp)


def column_linear(in_features: int, out_features: int, bias: bool,
                  rows: tuple[int, int]) -> Linear:
    """The output rows [start, stop) of an [out_features, in_features] checkpoint linear; rows
    past out_features are zeros (the padded vocabulary)."""
    lin = Linear(in_features, rows[1] - rows[0], bias=bias)
    for param in (lin.weight, lin.bias) if bias else (lin.weight,):
        shard(param, 0, out_features, rows)
    return lin


class LinearGroup:
    """Linears that read the same input, called one by one: what a group is before packing."""

    def __init__(self, *linears: Linear):
        self.linears = linears

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(lin(x) for lin in self.linears)


def pack_group(group: LinearGroup) -> LinearGroup | PackedWeights:
    """One packed GEMM for the group's linears; the group itself where packing does not apply
    (another device or dtype, or an int8 linear among them)."""
    packable = all(isinstance(lin, Linear) and can_pack(lin.weight) for lin in group.linears)
    return PackedWeights(*group.linears) if packable else group

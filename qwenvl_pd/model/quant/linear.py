"""W8A8 linears as msModelSlim writes them and vLLM-Ascend runs them (npu_quant_matmul):

static  (W8A8):         x_q = round(x / input_scale + input_offset) in int8, per tensor;
                        y = (x_q @ w^T + quant_bias) * deq_scale   (int32 accumulation)
dynamic (W8A8_DYNAMIC): x_q = round(x / s_t), s_t = max|x_t| / 127 per token;
                        y = (x_q @ w^T) * s_t * weight_scale + bias

Weights stay int8 [out, in]; on CPU torch._int_mm gives the exact int32 accumulation. Under
tensor parallelism the per-channel tensors follow the weight rows of a column-parallel linear;
a row-parallel one splits the input columns, so its per-tensor input scale is replicated and
its bias is added on rank 0 only (the all-reduce sums it once). The dynamic scale of a
row-parallel input is its local slice's, as on the NPU.
"""
import torch
from torch import nn

from qwenvl_pd.model.parallel import Shard, TensorParallel, all_reduce

FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def quantize_static(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """x [N, in] float -> int8, one scale and offset for the tensor."""
    return torch.round(x.float() * (1.0 / scale) + offset).clamp_(-128, 127).to(torch.int8)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, in] float -> (int8 [N, in], scale [N, 1] float32), symmetric per row."""
    scale = x.float().abs().amax(-1, keepdim=True) / 127
    q = torch.round(x.float() / scale.clamp(min=1e-12)).clamp_(-127, 127).to(torch.int8)
    return q, scale


def int8_matmul(q: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """q [N, in] int8 @ weight [out, in] int8 -> [N, out] int32, exact."""
    if q.device.type == "cpu":
        return torch._int_mm(q, weight.t())
    return torch.matmul(q.float(), weight.t().float()).round().to(torch.int32)  # exact below 2^24


def decode_deq_scale(t: torch.Tensor) -> torch.Tensor:
    """float16 models store deq_scale as int64 holding the float32's bits."""
    if t.dtype == torch.int64:
        return (t & 0xFFFFFFFF).to(torch.int32).view(torch.float32)
    return t.float()


def qparam(shape, dtype, spec: Shard | None, dtypes, decode=None) -> nn.Parameter:
    """A parameter the loader fills only from a tensor of one of `dtypes` (model/loader.py)."""
    p = nn.Parameter(torch.zeros(shape, dtype=dtype), requires_grad=False)
    if spec is not None:
        p.shard = spec
    p.dtypes, p.decode = dtypes, decode
    return p


class QuantLinear(nn.Module):
    """What both schemes share: the int8 weight and its per-channel scale and offset."""
    scheme = ""

    def __init__(self, rows: int, cols: int, spec: Shard, row_parallel: bool, tp: TensorParallel):
        super().__init__()
        out_spec = None if row_parallel else Shard(0, spec.pieces, spec.full)
        self.weight = qparam((rows, cols), torch.int8, spec, (torch.int8,))
        self.weight_scale = qparam((rows, 1), torch.float32, out_spec, FLOATS)
        self.weight_offset = qparam((rows, 1), torch.float32, out_spec, FLOATS)
        self.out_spec, self.out_features = out_spec, rows
        self.tp = tp if row_parallel else TensorParallel()
        self.adds_bias = not row_parallel or tp.rank == 0

    def pack(self) -> None:
        """Nothing to reorder: the int8 GEMM reads the weight as loaded."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out = self.matmul(flat).to(x.dtype)
        return all_reduce(out.view(*x.shape[:-1], self.out_features), self.tp)


class W8A8Linear(QuantLinear):
    scheme = "W8A8"

    def __init__(self, rows: int, cols: int, spec: Shard, row_parallel: bool, tp: TensorParallel):
        super().__init__(rows, cols, spec, row_parallel, tp)
        self.input_scale = qparam((1,), torch.float32, None, FLOATS)
        self.input_offset = qparam((1,), torch.float32, None, (torch.int8, *FLOATS))
        self.deq_scale = qparam((rows,), torch.float32, self.out_spec, (torch.float32, torch.int64),
                                decode_deq_scale)
        self.quant_bias = qparam((rows,), torch.int32, self.out_spec, (torch.int32,))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:  # [N, in] -> [N, out] float32
        acc = int8_matmul(quantize_static(x, self.input_scale, self.input_offset), self.weight)
        if self.adds_bias:
            acc = acc + self.quant_bias
        return acc.float() * self.deq_scale


class W8A8DynamicLinear(QuantLinear):
    scheme = "W8A8_DYNAMIC"

    def __init__(self, rows: int, cols: int, spec: Shard, row_parallel: bool, tp: TensorParallel,
                 bias: bool = False, dtype: torch.dtype = torch.float32):
        super().__init__(rows, cols, spec, row_parallel, tp)
        self.bias = qparam((rows,), dtype, self.out_spec, FLOATS) if bias else None

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        q, scale = quantize_per_token(x)
        out = int8_matmul(q, self.weight).float() * scale * self.weight_scale.t()
        return out + self.bias.float() if self.bias is not None and self.adds_bias else out

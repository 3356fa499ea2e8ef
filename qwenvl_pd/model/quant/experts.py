"""MoE experts in msModelSlim's W8A8_DYNAMIC layout: one gate/up/down linear per expert
(mlp.experts.{e}.gate_proj.weight int8 [inter, hidden], ...), as vLLM-Ascend loads them."""
import torch
import torch.nn.functional as F
from torch import nn

from qwenvl_pd.model.parallel import Shard, TensorParallel
from qwenvl_pd.model.quant.linear import W8A8DynamicLinear

NO_REDUCE = TensorParallel()  # SparseMoE sums every expert's output in one all-reduce


class ExpertMLP(nn.Module):
    def __init__(self, hidden: int, inter: int, rows: tuple[int, int]):
        super().__init__()
        n = rows[1] - rows[0]
        self.gate_proj = W8A8DynamicLinear(n, hidden, Shard(0, (rows,), inter), False, NO_REDUCE)
        self.up_proj = W8A8DynamicLinear(n, hidden, Shard(0, (rows,), inter), False, NO_REDUCE)
        self.down_proj = W8A8DynamicLinear(hidden, n, Shard(1, (rows,), inter), True, NO_REDUCE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class QuantExperts(nn.ModuleDict):
    """The experts this rank holds: [first, stop) whole under expert parallel, else every
    expert's slice of the intermediate axis. Keys are global expert ids (the checkpoint's)."""

    def __init__(self, num_experts: int, hidden: int, inter: int, tp: TensorParallel):
        first, stop = tp.split(num_experts) if tp.expert_parallel else (0, num_experts)
        rows = (0, inter) if tp.expert_parallel else tp.split(inter)
        super().__init__({str(e): ExpertMLP(hidden, inter, rows) for e in range(first, stop)})
        self.first, self.stop = first, stop

    def run(self, local: int, x: torch.Tensor) -> torch.Tensor:
        """x [tokens, hidden] through expert first + local -> [tokens, hidden]."""
        return self[str(self.first + local)](x)

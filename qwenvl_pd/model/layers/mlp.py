import torch
import torch.nn.functional as F
from torch import nn

from qwenvl_pd.model.layers.linear import LinearGroup, RowLinear, column_linear, pack_group
from qwenvl_pd.model.parallel import TensorParallel


class GatedMLP(nn.Module):
    """gate/up column-parallel, down row-parallel: one all-reduce per MLP."""

    def __init__(self, hidden: int, inter: int, tp: TensorParallel = TensorParallel()):
        super().__init__()
        rows = tp.split(inter)
        self.gate_proj = column_linear(hidden, inter, False, rows)
        self.up_proj = column_linear(hidden, inter, False, rows)
        self.down_proj = RowLinear(inter, hidden, tp)
        self.gate_up = LinearGroup(self.gate_proj, self.up_proj)  # packed by pack()

    def pack(self) -> None:
        self.gate_up = pack_group(LinearGroup(self.gate_proj, self.up_proj))  # maybe swapped since
        self.down_proj.pack()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x)
        return self.down_proj(F.silu(gate) * up)

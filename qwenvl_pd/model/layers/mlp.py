import torch
import torch.nn.functional as F
from torch import nn

from qwenvl_pd.model.layers.linear import Linear, LinearGroup, pack_group


class GatedMLP(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = Linear(hidden, inter, bias=False)
        self.up_proj = Linear(hidden, inter, bias=False)
        self.down_proj = Linear(inter, hidden, bias=False)
        self.gate_up = LinearGroup(self.gate_proj, self.up_proj)  # packed by pack()

    def pack(self) -> None:
        self.gate_up = pack_group(self.gate_up)
        self.down_proj.pack()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x)
        return self.down_proj(F.silu(gate) * up)

import torch
import torch.nn.functional as F
from torch import nn

from qwenvl_pd.model.layers.linear import Linear, pack_group


class GatedMLP(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = Linear(hidden, inter, bias=False)
        self.up_proj = Linear(hidden, inter, bias=False)
        self.down_proj = Linear(inter, hidden, bias=False)
        self.packed_gate_up = None

    def pack(self) -> None:
        self.packed_gate_up = pack_group(self.gate_proj, self.up_proj)
        self.down_proj.pack()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed_gate_up is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = self.packed_gate_up(x)
        return self.down_proj(F.silu(gate) * up)

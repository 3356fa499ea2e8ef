"""Test-only reference for W8A8: each quantised linear recomputed in float64 from the
checkpoint's own tensors by dequantising (x_q - offset) * scale and w_q * weight_scale, the
textbook form of the math the int8 path runs as integer GEMMs."""
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from qwenvl_pd.model.layers.mlp import GatedMLP
from qwenvl_pd.model.quant.experts import QuantExperts
from qwenvl_pd.model.quant.linear import QuantLinear, W8A8Linear
from qwenvl_pd.model.text import Attention


def checkpoint_tensors(path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}


class RefLinear(nn.Module):
    def __init__(self, t: dict, prefix: str, static: bool):
        super().__init__()
        g = lambda n: t.get(f"{prefix}.{n}")  # noqa: E731
        self.w = g("weight").double() * g("weight_scale").double()  # [out, in]
        self.static, self.bias = static, g("bias")
        if static:
            self.s, self.o = g("input_scale").double(), g("input_offset").double()
            # quant_bias holds round(bias / deq) minus the offset's share of x_q @ w_q^T
            w_sum = g("weight").double().sum(1)
            self.b = (g("quant_bias").double() + self.o * w_sum) * g("deq_scale").double()

    def pack(self) -> None:
        pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x64 = x.double()
        if self.static:
            xq = torch.clamp(torch.round(x64 / self.s + self.o), -128, 127)
            return F.linear((xq - self.o) * self.s, self.w, self.b).to(x.dtype)
        s = x64.abs().amax(-1, keepdim=True) / 127
        out = F.linear(torch.round(x64 / s).clamp(-127, 127) * s, self.w)
        return (out if self.bias is None else out + self.bias.double()).to(x.dtype)


class RefExperts(nn.ModuleDict):
    def __init__(self, t: dict, prefix: str, experts: QuantExperts):
        super().__init__({k: _ref_mlp(t, f"{prefix}.{k}") for k in experts})
        self.first, self.stop = experts.first, experts.stop

    def run(self, local: int, x: torch.Tensor) -> torch.Tensor:
        m = self[str(self.first + local)]
        return m["down_proj"](F.silu(m["gate_proj"](x)) * m["up_proj"](x))


def _ref_mlp(t, prefix) -> nn.ModuleDict:
    return nn.ModuleDict({p: RefLinear(t, f"{prefix}.{p}", False)
                          for p in ("gate_proj", "up_proj", "down_proj")})


def use_reference(model: nn.Module, path) -> int:
    """Swap every int8 module of `model` for its float64 reference; -> how many were swapped."""
    t, swapped = checkpoint_tensors(path), 0
    for name, module in list(model.named_modules()):
        parent, _, attr = name.rpartition(".")
        if isinstance(module, QuantLinear):
            ref = RefLinear(t, name, isinstance(module, W8A8Linear))
        elif isinstance(module, QuantExperts):
            ref = RefExperts(t, name, module)
        else:
            continue
        setattr(model.get_submodule(parent), attr, ref)
        swapped += 1
    for module in model.modules():
        if isinstance(module, (Attention, GatedMLP)):
            module.pack()  # regroup q/k/v and gate/up over the swapped modules
    return swapped

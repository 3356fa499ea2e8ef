"""Swap the float modules a description quantises for int8 ones before loading, and check
after loading that the tensors fit the scheme."""
import torch
from torch import nn

from qwenvl_pd.model.layers.linear import Linear, RowLinear
from qwenvl_pd.model.layers.moe import Experts
from qwenvl_pd.model.parallel import TensorParallel
from qwenvl_pd.model.quant.description import QuantDescription, QuantError
from qwenvl_pd.model.quant.experts import QuantExperts
from qwenvl_pd.model.quant.linear import QuantLinear, W8A8DynamicLinear, W8A8Linear

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantise_modules(model: nn.Module, desc: QuantDescription, tp: TensorParallel) -> None:
    """Every decoder projection and MoE expert block the description marks W8A8 or
    W8A8_DYNAMIC becomes its int8 module; a quantised tensor anywhere else is refused."""
    covered: set[str] = set()
    for name, module in list(model.named_modules()):
        parent, _, attr = name.rpartition(".")
        new = _replacement(name, attr, module, desc, tp, covered)
        if new is not None:
            setattr(model.get_submodule(parent), attr, new.to(_device(module)))
    stray = sorted(desc.quantised() - covered)
    if stray:
        raise QuantError(f"tensor {stray[0]} is {desc.scheme(stray[0])}: only the decoder's "
                         f"projections ({', '.join(PROJECTIONS)}) and MoE experts run quantised "
                         f"here ({len(stray)} such tensors)")


def _replacement(name, attr, module, desc, tp, covered) -> nn.Module | None:
    if isinstance(module, Experts):
        return _experts(name, module, desc, tp, covered)
    scheme = desc.scheme(f"{name}.weight")
    if not isinstance(module, Linear) or attr not in PROJECTIONS or scheme == "FLOAT":
        return None
    covered.add(f"{name}.weight")
    rows, cols = module.weight.shape
    row = isinstance(module, RowLinear)
    if scheme == "W8A8":
        return W8A8Linear(rows, cols, module.weight.shard, row, tp)
    return W8A8DynamicLinear(rows, cols, module.weight.shard, row, tp, module.bias is not None,
                             module.weight.dtype)


def _experts(name, module: Experts, desc, tp, covered) -> nn.Module | None:
    num = module.gate_up_proj.shard.full if tp.expert_parallel else module.gate_up_proj.shape[0]
    keys = [f"{name}.{e}.{p}.weight" for e in range(num) for p in ("gate_proj", "up_proj", "down_proj")]
    schemes = {desc.scheme(k) for k in keys}
    if schemes == {"FLOAT"}:
        return None
    if schemes != {"W8A8_DYNAMIC"}:
        raise QuantError(f"{name}: experts must all be W8A8_DYNAMIC (the scheme run for MoE "
                         f"experts here), the description has {sorted(schemes)}")
    covered.update(keys)
    down = module.down_proj  # [experts, inter, hidden], split on experts or on inter
    inter = down.shape[1] if tp.expert_parallel else down.shard.full
    return QuantExperts(num, down.shape[2], inter, tp)


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def check_quantised(model: nn.Module) -> None:
    """msModelSlim's int8 weights are symmetric: a nonzero weight_offset would be ignored by
    the kernels (vLLM-Ascend's too), so it is refused rather than run wrong."""
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear) and module.weight_offset.any():
            raise QuantError(f"tensor {name}.weight_offset: nonzero offsets (asymmetric int8 "
                             f"weights) are not run; {module.scheme} needs symmetric weights")

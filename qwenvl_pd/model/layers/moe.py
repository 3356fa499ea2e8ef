"""Qwen3-VL MoE block: softmax router, top-k renormalised, experts stored as 3D tensors.

Split over ranks two ways. Tensor parallel: every rank holds every expert's slice of the
intermediate axis. Expert parallel: a rank holds num_experts / size whole experts. Either way
each rank sees every token (the activations are replicated across the group), computes its
part and one all-reduce sums the parts, so the routing is the unsharded model's.
"""
import torch
import torch.nn.functional as F
from torch import nn

from qwenvl_pd.model.expert_layout import fused_experts
from qwenvl_pd.model.parallel import TensorParallel, all_reduce, shard


class Router(nn.Module):
    def __init__(self, hidden: int, num_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden))


class Experts(nn.Module):
    """Held as the released layout: gate_up [E, hidden, 2*inter] (gate then up), down [E, inter,
    hidden]; either layout loads (model/expert_layout.py)."""

    def __init__(self, num_experts: int, hidden: int, inter: int, tp: TensorParallel):
        super().__init__()
        if tp.expert_parallel:
            self._whole_experts(num_experts, hidden, inter, tp)
        else:
            self._split_experts(num_experts, hidden, inter, tp)

    def _whole_experts(self, num_experts: int, hidden: int, inter: int, tp: TensorParallel) -> None:
        """Experts [first, stop), each complete."""
        self.first, self.stop = tp.split(num_experts)
        n = self.stop - self.first
        self.gate_up_proj = fused_experts(shard(nn.Parameter(torch.empty(n, hidden, 2 * inter)), 0,
                                                num_experts, (self.first, self.stop)))
        self.down_proj = fused_experts(shard(nn.Parameter(torch.empty(n, inter, hidden)), 0,
                                             num_experts, (self.first, self.stop)))

    def _split_experts(self, num_experts: int, hidden: int, inter: int, tp: TensorParallel) -> None:
        """Every expert, columns [a, b) of its intermediate axis (of gate and of up)."""
        self.first, self.stop = 0, num_experts
        a, b = tp.split(inter)
        self.gate_up_proj = fused_experts(shard(nn.Parameter(torch.empty(num_experts, hidden, 2 * (b - a))),
                                                2, 2 * inter, (a, b), (inter + a, inter + b)))
        self.down_proj = fused_experts(shard(nn.Parameter(torch.empty(num_experts, b - a, hidden)), 1,
                                             inter, (a, b)))
    linear_layout = False  # set by pack(): experts held as nn.Linear's [E, out, in]

    def pack(self) -> None:
        """After loading: hold the experts as [E, out, in]. `x @ w` on the released [E, in, out]
        layout takes oneDNN's slow path in bf16 on CPU (7-28 ms against 0.03 ms for a 128 x 96
        expert slice measured), F.linear on the transposed copy does not."""
        for name in ("gate_up_proj", "down_proj"):
            param = getattr(self, name)
            param.data = param.data.transpose(1, 2).contiguous()
        self.linear_layout = True

    def run(self, local: int, x: torch.Tensor) -> torch.Tensor:
        """x [tokens, hidden] through expert first + local -> [tokens, hidden]."""
        if not self.linear_layout:
            gate, up = (x @ self.gate_up_proj[local]).chunk(2, dim=-1)
            return (F.silu(gate) * up) @ self.down_proj[local]
        gate, up = F.linear(x, self.gate_up_proj[local]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down_proj[local])


class SparseMoE(nn.Module):
    def __init__(self, hidden: int, inter: int, num_experts: int, top_k: int,
                 tp: TensorParallel = TensorParallel()):
        super().__init__()
        self.gate = Router(hidden, num_experts)
        self.experts = Experts(num_experts, hidden, inter, tp)
        self.top_k, self.tp = top_k, tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden]."""
        probs = F.softmax(F.linear(x, self.gate.weight), dim=-1, dtype=torch.float)
        weights, experts = probs.topk(self.top_k, dim=-1)  # [T, k]
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        out, held = torch.zeros_like(x), self.experts
        for e in experts.unique().tolist():
            if not held.first <= e < held.stop:
                continue  # another rank's expert
            token, slot = torch.where(experts == e)
            y = held.run(e - held.first, x[token])
            out.index_add_(0, token, y * weights[token, slot, None])
        return all_reduce(out, self.tp)

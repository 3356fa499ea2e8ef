"""Qwen3-VL MoE block: softmax router, top-k renormalised, experts stored as 3D tensors."""
import torch
import torch.nn.functional as F
from torch import nn


class Router(nn.Module):
    def __init__(self, hidden: int, num_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden))


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden: int, inter: int):
        super().__init__()
        # checkpoint layout: gate_up [E, hidden, 2*inter], down [E, inter, hidden]
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, hidden, 2 * inter))
        self.down_proj = nn.Parameter(torch.empty(num_experts, inter, hidden))


class SparseMoE(nn.Module):
    def __init__(self, hidden: int, inter: int, num_experts: int, top_k: int):
        super().__init__()
        self.gate = Router(hidden, num_experts)
        self.experts = Experts(num_experts, hidden, inter)
        self.top_k = top_k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden]."""
        probs = F.softmax(F.linear(x, self.gate.weight), dim=-1, dtype=torch.float)
        weights, experts = probs.topk(self.top_k, dim=-1)  # [T, k]
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        for e in experts.unique().tolist():
            token, slot = torch.where(experts == e)
            gate, up = (x[token] @ self.experts.gate_up_proj[e]).chunk(2, dim=-1)
            y = (F.silu(gate) * up) @ self.experts.down_proj[e]
            out.index_add_(0, token, y * weights[token, slot, None])
        return out

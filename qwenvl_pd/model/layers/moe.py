"""Qwen3-VL MoE block: softmax router, top-k renormalised, experts stored as 3D tensors.

Split over ranks two ways. Tensor parallel: every rank holds every expert's slice of the
intermediate axis. Expert parallel: a rank holds num_experts / size whole experts. Either way
each rank sees every token (the activations are replicated across the group), computes its
part and one all-reduce sums the parts, so the routing is the unsharded model's.
"""
import torch
import torch.nn.functional as F
from torch import nn

from qwenvl_pd.model.parallel import TensorParallel, all_reduce, shard


class Router(nn.Module):
    def __init__(self, hidden: int, num_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden))


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden: int, inter: int, tp: TensorParallel):
        super().__init__()
        # checkpoint layout: gate_up [E, hidden, 2*inter] (gate then up), down [E, inter, hidden]
        if tp.expert_parallel:
            self.first, self.stop = tp.split(num_experts)
            n, cols = self.stop - self.first, inter
            gate_up = down = ((self.first, self.stop),)
            dims = (0, 0)
        else:
            self.first, self.stop = 0, num_experts
            (a, b), n = tp.split(inter), num_experts
            cols, gate_up, down, dims = b - a, ((a, b), (inter + a, inter + b)), ((a, b),), (2, 1)
        self.gate_up_proj = nn.Parameter(torch.empty(n, hidden, 2 * cols))
        self.down_proj = nn.Parameter(torch.empty(n, cols, hidden))
        shard(self.gate_up_proj, dims[0], num_experts if dims[0] == 0 else 2 * inter, *gate_up)
        shard(self.down_proj, dims[1], num_experts if dims[1] == 0 else inter, *down)


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
            gate, up = (x[token] @ held.gate_up_proj[e - held.first]).chunk(2, dim=-1)
            y = (F.silu(gate) * up) @ held.down_proj[e - held.first]
            out.index_add_(0, token, y * weights[token, slot, None])
        return all_reduce(out, self.tp)

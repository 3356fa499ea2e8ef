"""Tensor and expert parallelism: which slice of each checkpoint tensor a rank holds, and the
two collectives the forward needs (sum of partial outputs, gather of vocab slices)."""
from dataclasses import dataclass

import torch
import torch.distributed as dist

from qwenvl_pd.model_config import TextConfig


@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0
    size: int = 1
    expert_parallel: bool = False

    def split(self, total: int) -> tuple[int, int]:
        """(start, stop) of this rank's even share of `total` (which must divide)."""
        share = total // self.size
        return self.rank * share, (self.rank + 1) * share

    def padded_split(self, total: int) -> tuple[int, int]:
        """(start, stop) of this rank's share of `total` rounded up: the vocabulary, whose last
        shard may run past the checkpoint's rows (padded with zeros)."""
        share = -(-total // self.size)
        return self.rank * share, (self.rank + 1) * share

    def kv_heads(self, total: int) -> tuple[int, int]:
        """(first, count) of the KV heads this rank holds; with more ranks than KV heads each
        head is replicated on size / total ranks, the ranks whose query heads use it."""
        if total >= self.size:
            share = total // self.size
            return self.rank * share, share
        return self.rank * total // self.size, 1


@dataclass(frozen=True)
class Shard:
    """The part of a checkpoint tensor a parameter holds: `pieces` are (start, stop) ranges along
    `dim`, concatenated; `full` is the size the checkpoint must have along `dim`. A range past
    `full` reads as zeros (vocabulary padding)."""
    dim: int
    pieces: tuple[tuple[int, int], ...]
    full: int


def shard(param: torch.Tensor, dim: int, full: int, *pieces: tuple[int, int]) -> torch.Tensor:
    param.shard = Shard(dim, pieces, full)
    return param


class TPError(ValueError):
    """The model cannot be split over this many ranks."""


def check_divisible(text: TextConfig, tp: TensorParallel) -> None:
    """Refuse at start a size the heads, MLP or experts do not divide (never wrong tokens)."""
    n = tp.size
    problems = [f"{what} ({count}) is not divisible by tensor_parallel_size {n}"
                for what, count in [("num_attention_heads", text.num_heads),
                                    ("intermediate_size", text.intermediate_size)]
                if count % n]
    if text.num_kv_heads % n and n % text.num_kv_heads:
        problems.append(f"num_key_value_heads ({text.num_kv_heads}) and tensor_parallel_size {n}: "
                        "neither divides the other")
    if text.num_experts:
        what, count = (("num_experts", text.num_experts) if tp.expert_parallel
                       else ("moe_intermediate_size", text.moe_intermediate_size))
        if count % n:
            problems.append(f"{what} ({count}) is not divisible by tensor_parallel_size {n}")
    if problems:
        raise TPError("; ".join(problems))


def all_reduce(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """Sum of every rank's partial x (row-parallel outputs), rounded once to x's dtype; x
    itself at size 1."""
    if tp.size == 1:
        return x
    if tp.size == 2 or x.dtype not in (torch.bfloat16, torch.float16) or x.device.type != "cpu":
        dist.all_reduce(x)  # two halves: the one addition is rounded once already
        return x
    # gloo's bf16 ring rounds after every hop (at 4 ranks 30% of the sums off the once-rounded
    # one); on accelerators HCCL/NCCL keep their own reduction, as other servers do, rather than
    # double the bytes of every decode step's all-reduce
    wide = x.float()
    dist.all_reduce(wide)
    return wide.to(x.dtype)


def gather_columns(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """x [..., cols / size] on every rank -> [..., cols] on rank 0, which alone samples (the
    other ranks get their own slice back): half the traffic of an all-gather."""
    if tp.size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(tp.size)] if tp.rank == 0 else None
    dist.gather(x, parts, dst=0)
    return torch.cat(parts, dim=-1) if tp.rank == 0 else x

"""Token embedding split by vocabulary rows over the tensor-parallel ranks."""
import torch
import torch.nn.functional as F
from torch import nn

from qwenvl_pd.model.parallel import TensorParallel, all_reduce, shard


class VocabEmbedding(nn.Embedding):
    """Rows [start, stop) of the vocabulary (the last shard padded with zero rows); a rank
    looks up the ids it holds, zeros the others, and one all-reduce completes every row."""

    def __init__(self, vocab_size: int, hidden: int, tp: TensorParallel):
        self.start, self.stop = tp.padded_split(vocab_size)
        super().__init__(self.stop - self.start, hidden)
        shard(self.weight, 0, vocab_size, (self.start, self.stop))
        self.tp = tp

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        held = (ids >= self.start) & (ids < self.stop)
        x = F.embedding((ids - self.start).clamp(0, self.stop - self.start - 1), self.weight)
        return all_reduce(x * held[:, None].to(x.dtype), self.tp)

"""Decode steps replayed from graphs captured per batch-size bucket (CUDA graphs, ACL graphs).

A graph replays fixed shapes from fixed addresses, so every decode input lives in a static
buffer sized for the largest bucket; a batch of n runs the smallest bucket >= n with the extra
rows padded (they write their K/V into a scratch block nobody owns and attend to one key).
Graphs are also bucketed by block-table width (powers of two up to max_model_len): a static
step gathers and attends over every key its width allows, so short contexts would otherwise pay
for max_model_len. Without a graph API (CPU) the same static path runs eagerly, which is how
tests check it.
"""
from collections import Counter

import torch

from qwenvl_pd.model.layers.attention import AttentionMetadata, DecodeGroup

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
MIN_WIDTH = 16  # blocks of the narrowest width bucket


class DecodeGraphs:
    def __init__(self, model, kv_cache: torch.Tensor, block_size: int, max_blocks: int,
                 max_batch: int, scratch_block: int, api=None):
        self.model, self.kv_cache, self.block_size = model, kv_cache, block_size
        self.max_blocks = max_blocks
        self.buckets = [b for b in BUCKETS if b < max_batch] + [max_batch]
        self.widths = _powers_of_two(MIN_WIDTH, max_blocks) + [max_blocks]
        self.scratch_slot = scratch_block * block_size
        dev, n = kv_cache.device, self.buckets[-1]
        self.ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(3, n, dtype=torch.long, device=dev)
        self.slots = torch.full((n,), self.scratch_slot, dtype=torch.long, device=dev)
        self.tables = torch.zeros(n, max_blocks, dtype=torch.long, device=dev)
        self.key_mask = torch.zeros(n, 1, 1, max_blocks * block_size, dtype=torch.bool, device=dev)
        self.lens = torch.ones(n, dtype=torch.long, device=dev)  # the key mask's row sums
        self.hidden = torch.zeros(n, model.config.text.hidden_size, dtype=kv_cache.dtype, device=dev)
        self.graphs = self._capture(api) if api is not None else {}
        self.runs = Counter()  # (batch bucket, width) -> steps run

    def fits(self, batch: int, blocks_per_seq: int) -> bool:
        return batch <= self.buckets[-1] and blocks_per_seq <= self.max_blocks

    @torch.inference_mode()
    def run(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
            tables: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        """ids, slots, lens [n]; positions [3, n]; tables [n, blocks] -> hidden [n, hidden]."""
        n = ids.shape[0]
        bucket = next(b for b in self.buckets if b >= n)
        width = next(w for w in self.widths if w >= tables.shape[1])
        self.runs[bucket, width] += 1
        self._fill(ids, positions, slots, tables, lens, bucket)
        if (bucket, width) in self.graphs:
            self.graphs[bucket, width].replay()
        else:
            self._forward(bucket, width)
        return self.hidden[:n]

    def _fill(self, ids, positions, slots, tables, lens, bucket: int) -> None:
        n = ids.shape[0]
        self.ids[:n].copy_(ids)
        self.positions[:, :n].copy_(positions)
        self.slots[:n].copy_(slots)
        self.slots[n:bucket].fill_(self.scratch_slot)
        self.tables[:n].zero_()
        self.tables[:n, :tables.shape[1]].copy_(tables)
        keys = torch.arange(self.key_mask.shape[-1], device=lens.device)
        self.key_mask[:n, 0, 0].copy_(keys[None] < lens[:, None])
        self.key_mask[n:bucket] = False
        self.key_mask[n:bucket, 0, 0, 0] = True  # padded rows attend to one key, never to nothing
        self.lens[:n].copy_(lens)
        self.lens[n:bucket] = 1

    def _forward(self, bucket: int, width: int) -> None:
        group = DecodeGroup(0, bucket, self.tables[:bucket, :width],
                            self.key_mask[:bucket, ..., :width * self.block_size],
                            lens=self.lens[:bucket])
        meta = AttentionMetadata(self.slots[:bucket], bucket, [group], [])
        self.hidden[:bucket] = self.model(self.ids[:bucket], self.positions[:, :bucket],
                                          self.kv_cache, meta)

    def _capture(self, api) -> dict:
        graph_cls, graph_ctx = api
        graphs, pool = {}, None
        # largest first: the smaller ones reuse its memory pool
        for bucket in reversed(self.buckets):
            self._fill_padding(bucket)
            for width in reversed(self.widths):
                self._forward(bucket, width)  # warm-up outside the graph
                graph = graph_cls()
                with graph_ctx(graph, pool=pool):
                    self._forward(bucket, width)
                pool = graph.pool()
                graphs[bucket, width] = graph
        return graphs

    def _fill_padding(self, bucket: int) -> None:
        self.slots[:bucket].fill_(self.scratch_slot)
        self.key_mask[:bucket] = False
        self.key_mask[:bucket, 0, 0, 0] = True
        self.lens[:bucket] = 1


def _powers_of_two(low: int, below: int) -> list[int]:
    out = []
    while low < below:
        out.append(low)
        low *= 2
    return out

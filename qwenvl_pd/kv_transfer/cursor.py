"""Which parts of a streaming request's KV decode still has to read, from prefill's progress.

A block is read once per layer, and only once it is final there: block b of layer l when every
token of it is (tokens_ready for all layers, chunk_tokens for the layers the current chunk has
passed); the prompt's last, partly filled block once the whole prompt is. So no read ever races
a write of the bytes it keeps. Pure arithmetic: nothing here touches Mooncake.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Read:
    layers: range
    first_block: int  # index into the request's block list
    stop_block: int


class ReadCursor:
    def __init__(self, num_layers: int, block_size: int, prompt_len: int, num_blocks: int):
        if num_blocks * block_size < prompt_len:
            raise ValueError(f"{num_blocks} blocks of {block_size} cannot hold {prompt_len} tokens")
        self.block_size, self.prompt_len, self.num_blocks = block_size, prompt_len, num_blocks
        self.done = [0] * num_layers  # blocks read so far, per layer

    @property
    def complete(self) -> bool:
        return all(d == self.num_blocks for d in self.done)

    def ready(self, tokens: int) -> int:
        """Blocks final once `tokens` prompt tokens are."""
        if tokens >= self.prompt_len:
            return self.num_blocks
        return tokens // self.block_size

    def advance(self, tokens_ready: int, chunk_tokens: int, layers_ready: int) -> list[Read]:
        """The reads this progress allows beyond what was read, consecutive layers that need the
        same blocks as one read; marks them read."""
        reads: list[Read] = []
        for layer, done in enumerate(self.done):
            target = self.ready(chunk_tokens if layer < layers_ready else tokens_ready)
            target = max(target, self.ready(tokens_ready))
            if target <= done:
                continue
            last = reads[-1] if reads else None
            if last and last.layers.stop == layer and (last.first_block, last.stop_block) == (done, target):
                reads[-1] = Read(range(last.layers.start, layer + 1), done, target)
            else:
                reads.append(Read(range(layer, layer + 1), done, target))
            self.done[layer] = target
        return reads

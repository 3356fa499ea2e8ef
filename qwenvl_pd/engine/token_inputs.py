"""The flat token inputs of one step: ids, M-RoPE positions, cache slots, placeholder mask."""
from collections.abc import Callable

import torch

from qwenvl_pd.engine.sequence import ScheduledChunk, Sequence

# (seq, start, end) -> the chunk's placeholder mask [end - start]
VisionMask = Callable[[Sequence, int, int], torch.Tensor]


def flat_tokens(chunks: list[ScheduledChunk], block_size: int, vision: VisionMask):
    """-> ids list, positions [3, T], slots list, mask [T] of the chunks' tokens, in order.
    A generated token costs a few list appends: its position is index + delta on all three
    rows and it never holds a placeholder, so runs of them become one tensor each."""
    ids, slots, pos, masks, run = [], [], [], [], []
    for c in chunks:
        s, start = c.seq, c.seq.num_computed
        if c.num_tokens == 1 and start >= s.prompt_len:
            ids.append(s.token_ids[start])
            slots.append(s.block_ids[start // block_size] * block_size + start % block_size)
            run.append(start + s.mrope_delta)
            continue
        _flush(run, pos, masks)
        end = start + c.num_tokens
        ids.extend(s.token_ids[start:end])
        slots.extend(s.block_ids[i // block_size] * block_size + i % block_size for i in range(start, end))
        pos.append(s.positions(start, end))
        masks.append(vision(s, start, end))
    _flush(run, pos, masks)
    return ids, torch.cat(pos, dim=1), slots, torch.cat(masks)


def _flush(run: list[int], pos: list, masks: list) -> None:
    if run:
        pos.append(torch.tensor(run, dtype=torch.long).expand(3, -1))
        masks.append(torch.zeros(len(run), dtype=torch.bool))
        run.clear()

"""What one forward needs, as rank 0 prepares it and every tensor-parallel rank receives it.

The message is typed both ways: rank 0 flattens a StepInput into one int64 tensor (a header of
sizes, then the index data) and one byte tensor (vision embeddings, bit-exact in any dtype);
the other ranks rebuild the same StepInput from them. No pickling, so nothing but these fields
can cross.
"""
from dataclasses import dataclass, field

import torch

from qwenvl_pd.model.layers.attention import PrefillSpan
from qwenvl_pd.model.text import VisualInjection

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@dataclass
class DecodeRows:
    """Decode rows that attend together, from row `start` of the flat batch."""
    start: int
    block_tables: torch.Tensor  # [rows, blocks] block ids, padded with 0
    lens: torch.Tensor          # [rows] keys per row, this step's token included


@dataclass
class StepInput:
    input_ids: torch.Tensor     # [T]
    positions: torch.Tensor     # [3, T]
    slot_mapping: torch.Tensor  # [T] where each new token's K/V is written
    logit_rows: torch.Tensor    # [R] rows of the hidden states that get logits, caller's order
    decode: list[DecodeRows] = field(default_factory=list)  # rows [0, num_decode), in groups
    prefills: list[PrefillSpan] = field(default_factory=list)  # block tables on the host
    visual: VisualInjection | None = None
    graph: bool = False         # decode only, one DecodeRows in the caller's order: replay a graph
    # [P] rows whose logits score prompt tokens (prompt_logprobs); every rank joins their gathers
    prompt_rows: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))


def encode(step: StepInput) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (int64 header + index data, uint8 embedding bytes)."""
    header = [int(step.graph), step.input_ids.numel(), step.logit_rows.numel(),
              len(step.decode), len(step.prefills), step.prompt_rows.numel()]
    ints = [step.input_ids, step.positions.flatten(), step.slot_mapping, step.logit_rows,
            step.prompt_rows]
    for g in step.decode:
        header += [g.start, *g.block_tables.shape]
        ints += [g.block_tables.flatten(), g.lens]
    for p in step.prefills:
        header += [p.start, p.end, p.context_len, p.block_table.numel()]
        ints.append(p.block_table)
    header_, floats = _encode_visual(step.visual)
    if step.visual is not None:
        ints.append(step.visual.mask.long())
    body = torch.cat([t.cpu().long() for t in ints])
    return torch.cat([torch.tensor([len(header) + len(header_)] + header + header_), body]), floats


def _encode_visual(v: VisualInjection | None) -> tuple[list[int], torch.Tensor]:
    if v is None:
        return [0], torch.empty(0, dtype=torch.uint8)
    deep = v.deepstack.shape[0] if v.deepstack is not None else 0
    tensors = [v.embeds] + ([v.deepstack] if deep else [])
    data = torch.cat([t.detach().cpu().contiguous().flatten().view(torch.uint8) for t in tensors])
    return [1, *v.embeds.shape, deep, DTYPES.index(v.embeds.dtype)], data


def decode(ints: torch.Tensor, data: torch.Tensor) -> StepInput:
    """The StepInput encode() flattened."""
    n = int(ints[0])
    header, body = iter(ints[1:1 + n].tolist()), _Reader(ints[1 + n:])
    graph, tokens, rows, groups, chunks, prompt = (next(header) for _ in range(6))
    step = StepInput(body.take(tokens), body.take(3 * tokens).view(3, tokens), body.take(tokens),
                     body.take(rows), graph=bool(graph))
    step.prompt_rows = body.take(prompt)
    for _ in range(groups):
        start, r, b = next(header), next(header), next(header)
        step.decode.append(DecodeRows(start, body.take(r * b).view(r, b), body.take(r)))
    for _ in range(chunks):
        start, end, ctx, b = (next(header) for _ in range(4))
        step.prefills.append(PrefillSpan(start, end, ctx, body.take(b)))
    if next(header):
        step.visual = _decode_visual(header, body.take(tokens).bool(), data)
    return step


def _decode_visual(header, mask: torch.Tensor, data: torch.Tensor) -> VisualInjection:
    count, hidden, deep, dtype = (next(header) for _ in range(4))
    values = data.view(DTYPES[dtype])
    embeds = values[:count * hidden].view(count, hidden)
    deepstack = values[count * hidden:].view(deep, count, hidden) if deep else None
    return VisualInjection(mask, embeds, deepstack)


class _Reader:
    def __init__(self, flat: torch.Tensor):
        self.flat, self.at = flat, 0

    def take(self, n: int) -> torch.Tensor:
        self.at += n
        return self.flat[self.at - n:self.at]

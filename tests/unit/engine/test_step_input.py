"""The step message every tensor-parallel rank rebuilds: exact round trips."""
import torch

from qwenvl_pd.engine.step_input import DecodeRows, StepInput, decode, encode
from qwenvl_pd.model.layers.attention import PrefillSpan
from qwenvl_pd.model.text import VisualInjection


def _same(a: StepInput, b: StepInput) -> None:
    for name in ("input_ids", "positions", "slot_mapping", "logit_rows", "prompt_rows"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert [(r.start, r.block_tables.tolist(), r.lens.tolist()) for r in a.decode] == \
        [(r.start, r.block_tables.tolist(), r.lens.tolist()) for r in b.decode]
    assert [(p.start, p.end, p.context_len, p.block_table.tolist()) for p in a.prefills] == \
        [(p.start, p.end, p.context_len, p.block_table.tolist()) for p in b.prefills]
    assert a.graph == b.graph


def test_mixed_step_with_vision_round_trips_bit_exactly():
    mask = torch.tensor([False, False, True, True, True, False])
    embeds = torch.tensor([[0.1, -2.0], [1e-30, 3.5], [float("inf"), -0.0]], dtype=torch.bfloat16)
    deep = torch.arange(12, dtype=torch.bfloat16).view(2, 3, 2) / 7
    step = StepInput(torch.tensor([7, 151655, 151655, 151655, 151655, 9]),
                     torch.arange(18).view(3, 6), torch.tensor([40, 17, 18, 19, 20, 21]),
                     torch.tensor([1, 0]),
                     decode=[DecodeRows(0, torch.tensor([[2, 5, 0]]), torch.tensor([35]))],
                     prefills=[PrefillSpan(1, 6, 5, torch.tensor([1]))],
                     visual=VisualInjection(mask[:], embeds, deep), prompt_rows=torch.tensor([1, 2, 3]))
    back = decode(*encode(step))
    _same(step, back)
    assert torch.equal(back.visual.mask, mask)
    assert back.visual.embeds.dtype == torch.bfloat16
    assert torch.equal(back.visual.embeds.view(torch.int16), embeds.view(torch.int16))
    assert torch.equal(back.visual.deepstack.view(torch.int16), deep.view(torch.int16))


def test_graph_step_without_vision_sends_no_bytes():
    step = StepInput(torch.tensor([3, 4]), torch.zeros(3, 2, dtype=torch.long), torch.tensor([16, 33]),
                     torch.arange(2), [DecodeRows(0, torch.tensor([[1, 0], [2, 3]]), torch.tensor([1, 18]))],
                     graph=True)
    ints, data = encode(step)
    assert data.numel() == 0
    # header: its length, graph, tokens, rows, groups, prefills, prompt rows, (start, rows,
    # blocks), no vision
    assert ints[:11].tolist() == [10, 1, 2, 2, 1, 0, 0, 0, 2, 2, 0]
    back = decode(ints, data)
    _same(step, back)
    assert back.visual is None

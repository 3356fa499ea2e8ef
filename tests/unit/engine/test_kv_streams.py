"""The engine's per-layer observer: exact layer-wise progress through chunked prefill, the
prefix-cache announce, and no hook at all for steps that stream nothing."""
import pytest
import torch

from qwenvl_pd import LLM, SamplingParams
from qwenvl_pd.engine.kv_streams import KVStreams, LayerProgress
from qwenvl_pd.engine.sequence import Sequence
from qwenvl_pd.model.tiny import make_tiny


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = make_tiny("qwen2_5_vl", tmp_path_factory.mktemp("kvs") / "tiny4",
                     text_overrides={"num_hidden_layers": 4})
    return LLM(model=str(path), max_model_len=256, max_num_batched_tokens=16)


def _run(llm: LLM, rid: str, token_ids: list[int]) -> None:
    engine = llm.stack.engine
    seq = Sequence(rid, list(token_ids), torch.arange(len(token_ids)).expand(3, -1).clone(), 0,
                   SamplingParams(max_tokens=1, temperature=0))
    engine.add(seq)
    while engine.has_work():
        engine.step()


def test_reports_every_group_of_each_chunk_then_the_chunk_in_all_layers(llm):
    reports: list[LayerProgress] = []
    streams = llm.stack.engine.stream_layers(2, reports.append)
    text = llm.stack.model.language_model()
    streams.watch("a")
    _run(llm, "a", list(range(1000, 1040)))  # 40 tokens: chunks of 16, 16, 8
    announce, *progress = reports
    assert (announce.tokens_ready, announce.chunk_tokens, announce.layers_ready) == (0, 0, 4)
    assert len(announce.block_ids) == 3  # all of the prompt's blocks, before any compute
    assert [(p.tokens_ready, p.chunk_tokens, p.layers_ready, p.block_ids) for p in progress] == [
        (0, 16, 2, ()), (16, 16, 4, ()),    # chunk 1: layers 0-1 after group 1, then all 4
        (16, 32, 2, ()), (32, 32, 4, ()),
        (32, 40, 2, ()), (40, 40, 4, ()),   # the last chunk streams too
    ]
    assert text.on_layer is None  # disarmed after each streaming step

    # the same prompt again: two full blocks from the prefix cache are final before any step
    reports.clear()
    streams.watch("b")
    _run(llm, "b", list(range(1000, 1040)))
    assert [(p.tokens_ready, p.chunk_tokens, p.layers_ready) for p in reports] == [
        (32, 32, 4), (32, 40, 2), (40, 40, 4)]
    assert reports[0].block_ids[:2] == announce.block_ids[:2]
    streams.unwatch("a")
    streams.unwatch("b")


def test_a_step_that_streams_nothing_sets_no_hook(llm):
    reports: list[LayerProgress] = []
    llm.stack.engine.stream_layers(1, reports.append)
    text = llm.stack.model.language_model()
    seen = []  # the hook as each forward's first layer runs
    handle = text.layers[0].register_forward_hook(lambda *_: seen.append(text.on_layer))
    try:
        _run(llm, "quiet", list(range(2000, 2020)))
    finally:
        handle.remove()
    assert reports == [] and seen == [None, None]  # two chunks, neither armed the hook


def test_a_group_of_zero_layers_is_refused(llm):
    with pytest.raises(ValueError, match="at least 1 layer"):
        KVStreams(llm.stack.model.language_model(), 4, 0, print)

"""The engine with the CPU kernel that reads the paged KV cache in place against transformers'
greedy tokens and the torch reference path: the same tokens in float32; in bfloat16, where a
random tiny model's near-ties make any two implementations part ways sooner or later, at least
as long an agreement with transformers as the reference has."""
import pytest
import torch
import transformers

from qwenvl_pd import LLM, SamplingParams
from qwenvl_pd.model.layers import cpu_paged
from tests.unit.engine.test_engine import _ref_greedy, _request

pytestmark = [pytest.mark.skipif(not cpu_paged.available(), reason="no C compiler here"),
              pytest.mark.usefixtures("default_threads")]  # the kernel's threaded path


@pytest.fixture(scope="module")
def path(tiny_dirs):
    return str(tiny_dirs["qwen2_5_vl"])


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_kernel_decode_equals_transformers_and_the_reference(path, dtype, monkeypatch):
    # prompts of 20-140 tokens and 40 decode steps: rows cross the kernel's 128-key chunks
    requests = [_request(i) for i in range(6)]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    llm = LLM(model=path, dtype=dtype, max_model_len=1024, max_num_batched_tokens=256)
    kernel = [o.outputs[0].token_ids for o in llm.generate(requests, params)]
    monkeypatch.setenv("QWENVL_PD_CPU_KERNEL", "0")
    assert not cpu_paged.available()
    reference = [o.outputs[0].token_ids for o in llm.generate(requests, params)]
    ref = transformers.AutoModelForImageTextToText.from_pretrained(
        path, dtype=getattr(torch, dtype)).eval()
    expected = [_ref_greedy(ref, llm.inputs.process(req), 40) for req in requests]
    if dtype == "float32":
        assert kernel == reference == expected
    else:  # measured: the kernel (f32 inside) agrees on 209 of 240 tokens, the reference on 151
        assert _agreement(kernel, expected) >= _agreement(reference, expected)


def _agreement(got: list[list[int]], expected: list[list[int]]) -> int:
    """Tokens up to each row's first difference, summed."""
    return sum(next((i for i, (a, b) in enumerate(zip(g, e)) if a != b), len(e))
               for g, e in zip(got, expected))


def test_decode_rows_attend_as_one_group_with_their_lengths_and_gather_nothing(path, monkeypatch):
    llm = LLM(model=path, max_model_len=1024)
    engine, runner = llm.engine, llm.engine.runner
    for i in range(6):
        engine.add(llm._sequence(llm.inputs.process(_request(2 * i)),
                                 SamplingParams(max_tokens=8, ignore_eos=True), i))
    engine.step()  # every prompt in one chunk: no earlier context to gather
    chunks = engine.scheduler.schedule()
    lens = sorted(c.seq.num_computed + 1 for c in chunks)
    meta = runner._metadata(runner.prepare(chunks))
    assert [(g.start, g.end) for g in meta.decode_groups] == [(0, 6)]
    assert sorted(meta.decode_groups[0].lens.tolist()) == lens
    assert runner.gather_buffer.numel() == 0
    monkeypatch.setenv("QWENVL_PD_CPU_KERNEL", "0")  # the reference: groups of 4, a scratch
    meta = runner._metadata(runner.prepare(chunks))
    assert [(g.start, g.end) for g in meta.decode_groups] == [(0, 4), (4, 6)]
    assert runner.gather_buffer.numel() > 0

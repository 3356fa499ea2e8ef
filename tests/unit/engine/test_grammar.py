"""Grammar-constrained sampling on the tiny random-weight model: the grammar alone makes the
output valid, a constrained row and an unconstrained one share a batch without touching each
other, logprobs are those of the masked distribution, and a continuation resumes the matcher."""
import json
import math
import re

import pytest
import torch

from qwenvl_pd import LLM, SamplingParams
from qwenvl_pd.engine.sampler import SamplerInput, apply_bitmask, sample
from qwenvl_pd.sampling_params import StructuredOutputsParams as Spec

PROMPT = "<|im_start|>user\nanswer<|im_end|>\n<|im_start|>assistant\n"
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["color", "n"],
          "properties": {"color": {"enum": ["red", "green", "blue"]},
                         "n": {"type": "integer", "minimum": 0, "maximum": 99}}}
JSON = Spec(json=json.dumps(SCHEMA))


@pytest.fixture(scope="module")
def llm(tiny_dirs):
    return LLM(tiny_dirs["qwen2_5_vl"], max_model_len=512)


def _params(spec=None, seed=None, **kw):
    return SamplingParams(temperature=0 if seed is None else 1.0, seed=seed, max_tokens=48,
                          structured_outputs=spec, **kw)


def _run(llm, params):
    return [o.outputs[0] for o in llm.generate([PROMPT] * len(params), params)]


def test_bitmask_blocks_clear_bits_and_ids_past_its_width():
    logits = torch.zeros(2, 70)
    mask = torch.tensor([[0b101, 0], [-1, -1]], dtype=torch.int32)  # row 0: tokens 0 and 2
    out = apply_bitmask(logits, mask)
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [0, 2]
    assert torch.isfinite(out[1]).all()  # every bit set: a row without a grammar, untouched
    assert logits.eq(0).all()  # the caller's logits stay as they were


def test_logprobs_are_of_the_masked_distribution():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.tensor([[0b0011]], dtype=torch.int32)
    [r] = sample(logits, [SamplerInput(SamplingParams(temperature=0, logprobs=2), 4, [], [])],
                 bitmask=mask)
    lse = math.log(math.exp(1) + math.exp(2))
    assert r.token_id == 1
    assert r.top_logprobs == [(1, pytest.approx(2 - lse)), (0, pytest.approx(1 - lse))]


def test_json_schema_output_validates_for_every_seed(llm):
    outs = _run(llm, [_params(JSON, seed=s) for s in range(8)])
    for o in outs:
        value = json.loads(o.text)
        assert o.finish_reason == "stop"
        assert set(value) == {"color", "n"} and value["color"] in ("red", "green", "blue")
        assert 0 <= value["n"] <= 99


@pytest.mark.parametrize("spec, pattern", [
    (Spec(regex=r"[a-c]{2,4}-\d"), r"[a-c]{2,4}-\d"),
    (Spec(choice=("yes", "no", "maybe")), r"yes|no|maybe"),
    (Spec(grammar='start: "x" ("+" "y")*'), r"x(\+y)*"),
    (Spec(grammar='root ::= "a" [0-9] [0-9]?'), r"a[0-9][0-9]?"),
])
def test_regex_choice_and_grammar_are_followed(llm, spec, pattern):
    for o in _run(llm, [_params(spec, seed=s) for s in range(3)]):
        assert re.fullmatch(pattern, o.text), o.text


def test_constrained_and_free_rows_in_one_batch_get_what_they_get_alone(llm):
    rows = [_params(JSON), _params(), _params(JSON, seed=7), _params(seed=7),
            _params(Spec(choice=("on", "off")), seed=3)]
    alone = [_run(llm, [p])[0].token_ids for p in rows]
    together = [o.token_ids for o in _run(llm, rows)]
    assert together == alone
    assert alone[0] != alone[1]  # the grammar changed the greedy tokens


def test_a_resumed_matcher_continues_where_the_tokens_left_off(llm):
    [full] = _run(llm, [_params(JSON)])
    head = list(full.token_ids[:3])
    spec = Spec(json=JSON.json, resume_token_ids=tuple(head))
    ids = llm.tokenizer.encode(PROMPT) + head
    [rest] = [o.outputs[0] for o in llm.generate([{"prompt_token_ids": ids}], [_params(spec)])]
    assert head + list(rest.token_ids) == list(full.token_ids)

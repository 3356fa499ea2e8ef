"""LLM(tensor_parallel_size=2) over gloo against transformers' greedy tokens on every family,
expert parallel, and a checkpoint with fewer KV heads than ranks; seeded sampling and logit_bias at
TP 1 and 2."""
import functools
import sys
from pathlib import Path

import pytest
import torch
import transformers

from qwenvl_pd import LLM, SamplingParams
from qwenvl_pd.model.parallel import TPError
from qwenvl_pd.model.parity import CASES, case_request, greedy, near_tie_failure, own_error
from qwenvl_pd.model.tiny import make_tiny

sys.path.insert(0, str(Path(__file__).parents[1] / "unit" / "model"))
from test_parity_transformers import transformers_greedy  # noqa: E402

CHECKPOINTS = {  # name -> (arch, text overrides, enable_expert_parallel)
    "qwen2_5_vl": ("qwen2_5_vl", {}, False),
    "qwen3_vl": ("qwen3_vl", {}, False),
    "qwen3_vl_moe": ("qwen3_vl_moe", {}, False),
    "qwen3_vl_moe_ep": ("qwen3_vl_moe", {}, True),
    "one_kv_head": ("qwen3_vl", {"num_key_value_heads": 1}, False),  # replicated on both ranks
}
GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_dirs):
    root = tmp_path_factory.mktemp("tp_offline")
    return {name: tiny_dirs[arch] if not over else make_tiny(arch, root / name, text_overrides=over)
            for name, (arch, over, _) in CHECKPOINTS.items()}


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_tp2_gives_transformers_greedy_tokens(checkpoints, name):
    path, expert_parallel = checkpoints[name], CHECKPOINTS[name][2]
    llm = LLM(str(path), max_model_len=2048, tensor_parallel_size=2,
              enable_expert_parallel=expert_parallel)
    requests = [case_request(case) for case in CASES]
    got = [o.outputs[0].token_ids for o in llm.generate(requests, GREEDY)]
    prompts = [llm.inputs.process(r) for r in requests]
    llm.close()
    # transformers' tokens are shared with the parity tests (and EP's with the plain MoE's)
    load_ref = functools.cache(lambda: transformers.AutoModelForImageTextToText.from_pretrained(
        path, dtype=torch.float32).eval())
    for case, prompt, tokens in zip(CASES, prompts, got):
        assert tokens == transformers_greedy(path, case, prompt, GREEDY.max_tokens, load_ref), f"{name}/{case}"


def test_tp2_in_bf16_gives_transformers_bf16_greedy_tokens_near_ties_allowed(tmp_path):
    path = make_tiny("qwen3_vl", tmp_path / "bf16", dtype="bfloat16")
    llm = LLM(str(path), max_model_len=2048, tensor_parallel_size=2, dtype="bfloat16")
    got = llm.generate([case_request("one_image")], GREEDY)[0].outputs[0].token_ids
    prompt = llm.inputs.process(case_request("one_image"))
    llm.close()
    load = transformers.AutoModelForImageTextToText.from_pretrained
    ref, ref32 = load(path, dtype=torch.bfloat16).eval(), load(path, dtype=torch.float32).eval()
    noise = own_error(ref, ref32, prompt)[1].abs().max().item()
    failure = near_tie_failure(got, greedy(ref, prompt, GREEDY.max_tokens), noise)
    assert failure is None, failure


def test_seeded_sampling_and_prompt_logprobs_are_the_same_at_tp1_and_tp2(tiny_dirs):
    path = str(tiny_dirs["qwen2_5_vl"])
    params = [SamplingParams(max_tokens=16, temperature=1.5, top_p=0.95, seed=s,
                             prompt_logprobs=3 if s == 1 else None) for s in (1, 2, 3)]
    params.append(SamplingParams(max_tokens=4, temperature=0, logit_bias={1000: 100.0}))  # on rank 0's logits
    prompt = case_request("one_image")
    runs, scores = [], []
    for tp in (1, 2):
        # 32-token chunks: each chunk's prompt rows go through the vocab-parallel gather
        llm = LLM(path, max_model_len=2048, tensor_parallel_size=tp, max_num_batched_tokens=10)
        outs = llm.generate([prompt] * 4, params)
        runs.append([o.outputs[0].token_ids for o in outs])
        scores.append([outs[0].prompt_logprobs, outs[1].prompt_logprobs])
        llm.close()
    assert runs[0] == runs[1]
    assert len({tuple(t) for t in runs[0][:3]}) == 3  # the seeds do differ
    assert runs[0][3] == [1000] * 4
    (tp1, none1), (tp2, none2) = scores
    assert none1 is None and none2 is None and len(tp1) == len(tp2) > 20 and tp1[0] is tp2[0] is None
    assert [list(p) for p in tp1[1:]] == [list(p) for p in tp2[1:]]  # the same ids, in order
    assert [v for p in tp1[1:] for v in p.values()] == pytest.approx(
        [v for p in tp2[1:] for v in p.values()], abs=1e-4)


def test_a_size_the_heads_do_not_divide_is_refused_before_any_rank_starts(tiny_dirs):
    with pytest.raises(TPError, match=r"num_attention_heads \(4\) is not divisible by tensor_parallel_size 3"):
        LLM(str(tiny_dirs["qwen2_5_vl"]), max_model_len=2048, tensor_parallel_size=3)

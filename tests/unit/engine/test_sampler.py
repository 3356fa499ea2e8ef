"""Sampler: greedy picks, min_tokens masking, exact penalty values, the exact top_k/top_p/min_p
sets, empirical draw frequencies, batch-independent seeded draws, raw logprobs, and a 152k-vocab
batch that must stay fast (no Python loops over the vocabulary)."""
import math

import pytest
import torch

from qwenvl_pd.engine import race, sampler
from qwenvl_pd.engine.sampler import (SampleResult, SamplerInput, apply_logit_bias, apply_penalties,
                                      filtered_probs, mask_min_tokens, sample, top_k_top_p_mask)
from qwenvl_pd.sampling_params import SamplingParams

INF = float("inf")
# probabilities picked clear of every top_p / min_p boundary used below
PROBS = [0.35, 0.25, 0.15, 0.10, 0.06, 0.05, 0.03, 0.01]
LOGITS = torch.tensor(PROBS).log()


def inp(position=0, prompt=(), output=(), eos=(), **params) -> SamplerInput:
    return SamplerInput(SamplingParams(**params), position, list(prompt), list(output), tuple(eos))


def support(params: SamplingParams, logits=LOGITS) -> set[int]:
    probs = filtered_probs(logits[None].clone(), [params])[0]
    return set(torch.nonzero(probs > 0).flatten().tolist())


def tokens(results: list[SampleResult]) -> list[int]:
    return [r.token_id for r in results]


# ---- greedy ----------------------------------------------------------------------------------

def test_greedy_rows_take_the_argmax():
    logits = torch.tensor([[0.1, 2.0, 0.3, -1.0, 0.0, 0.5],
                           [3.0, 2.0, 0.3, -1.0, 0.0, 0.5],
                           [0.1, 2.0, 0.3, -1.0, 0.0, 9.5]])
    inputs = [inp(temperature=0), inp(temperature=0.7, top_k=1), inp(temperature=0, seed=3)]
    assert tokens(sample(logits, inputs)) == [1, 0, 5]


def test_greedy_row_in_a_sampled_batch_keeps_its_argmax():
    logits = torch.zeros(4, 6)
    logits[2, 4] = 0.5
    inputs = [inp(), inp(seed=1), inp(temperature=0), inp(top_p=0.5)]
    for seed in range(5):
        assert sample(logits, inputs, torch.Generator().manual_seed(seed))[2].token_id == 4


def test_results_without_logprobs_carry_none_and_no_top_list():
    [r] = sample(torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0, 0.0]]), [inp(temperature=0)])
    assert r == SampleResult(1, None, [])


# ---- min_tokens ------------------------------------------------------------------------------

def test_min_tokens_masks_eos_and_stop_ids_exactly():
    logits = torch.arange(8.0)[None].repeat(3, 1)
    inputs = [inp(output=[1], eos=(7,), min_tokens=2, stop_token_ids=[5]),
              inp(output=[1, 2], eos=(7,), min_tokens=2, stop_token_ids=[5]),  # reached
              inp(output=[], eos=(7,), min_tokens=1, stop_token_ids=[5], ignore_eos=True)]
    expected = torch.arange(8.0)[None].repeat(3, 1)
    expected[0, [5, 7]] = -INF
    expected[2, 5] = -INF
    assert torch.equal(mask_min_tokens(logits, inputs), expected)


def test_min_tokens_holds_off_eos_until_the_count_is_reached():
    logits = torch.tensor([[0.0, 1.0, 2.0, 0.0, 4.0, 0.0, 0.0, 5.0]])  # eos 7 best, stop id 4 next
    picks = [sample(logits, [inp(output=[1] * n, eos=(7,), temperature=0, min_tokens=3,
                                 stop_token_ids=[4])])[0].token_id for n in range(5)]
    assert picks == [2, 2, 2, 7, 7]


def test_min_tokens_skips_ids_past_the_vocabulary():
    logits = torch.zeros(1, 6)
    out = mask_min_tokens(logits, [inp(eos=(151645,), min_tokens=1, stop_token_ids=[2, 99])])
    assert out[0].tolist() == [0, 0, -INF, 0, 0, 0]


# ---- penalties -------------------------------------------------------------------------------

ROW = [2.0, -1.0, 0.5, -2.0, 3.0, 0.0]


@pytest.mark.parametrize("params, expected", [
    # prompt {0, 1} and output {2, 3} are seen: positive / 2, negative * 2
    (dict(repetition_penalty=2.0), [1.0, -2.0, 0.25, -4.0, 3.0, 0.0]),
    # output only: counts {2: 2, 3: 1}; prompt tokens 0 and 1 untouched
    (dict(presence_penalty=0.5), [2.0, -1.0, 0.0, -2.5, 3.0, 0.0]),
    (dict(frequency_penalty=0.25), [2.0, -1.0, 0.0, -2.25, 3.0, 0.0]),
    (dict(presence_penalty=-1.0, frequency_penalty=0.5), [2.0, -1.0, 0.5, -1.5, 3.0, 0.0]),
    # repetition first, then presence + frequency
    (dict(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25),
     [1.0, -2.0, -0.75, -4.75, 3.0, 0.0]),
])
def test_penalties_give_exact_logits(params, expected):
    penalised = inp(prompt=[0, 1], output=[2, 2, 3], **params)
    plain = inp(prompt=[0, 1], output=[2, 2, 3])
    out = apply_penalties(torch.tensor([ROW, ROW]), [penalised, plain])
    assert out.tolist() == [expected, ROW]


def test_penalties_keep_masked_tokens_masked():
    row = torch.tensor([[-INF, 1.0, 1.0, 1.0, 1.0, 1.0]])
    out = apply_penalties(row, [inp(output=[0, 0], repetition_penalty=1.5, frequency_penalty=1.0)])
    assert out[0, 0] == -INF


def test_penalties_change_the_greedy_pick():
    logits = torch.tensor([[3.0, 2.5, 0.0, 0.0, 0.0, 0.0]])
    assert sample(logits, [inp(output=[0], temperature=0)])[0].token_id == 0
    assert sample(logits, [inp(output=[0], temperature=0, frequency_penalty=1.0)])[0].token_id == 1
    assert sample(logits, [inp(prompt=[0], temperature=0, repetition_penalty=1.5)])[0].token_id == 1
    assert sample(logits, [inp(prompt=[0], temperature=0, presence_penalty=2.0)])[0].token_id == 0


# ---- logit_bias ------------------------------------------------------------------------------

def test_logit_bias_adds_to_each_rows_own_tokens_and_skips_ids_past_the_vocabulary():
    out = apply_logit_bias(torch.tensor([ROW, ROW]), [inp(logit_bias={1: 5.0, 4: -100, 99: 3.0}), inp()])
    assert out.tolist() == [[2.0, 4.0, 0.5, -2.0, -97.0, 0.0], ROW]


def test_logit_bias_steers_greedy_and_sampled_rows_yet_logprobs_stay_raw():
    logits = torch.tensor([[3.0, 2.5, 0.0, 0.0, 0.0, 0.0]] * 2)
    inputs = [inp(temperature=0, logit_bias={5: 10.0}, logprobs=0), inp(seed=7, logit_bias={2: 100})]
    greedy, sampled = sample(logits, inputs)
    assert (greedy.token_id, sampled.token_id) == (5, 2)
    assert greedy.logprob == pytest.approx(logits[0].log_softmax(-1)[5].item())


# ---- top_k / top_p / min_p -------------------------------------------------------------------

@pytest.mark.parametrize("params, kept", [
    (dict(), set(range(8))),
    (dict(top_k=3), {0, 1, 2}),
    (dict(top_k=100), set(range(8))),
    (dict(top_p=0.55), {0, 1}),          # 0.35 < 0.55, 0.60 >= 0.55
    (dict(top_p=0.7), {0, 1, 2}),
    (dict(top_p=0.01), {0}),             # always at least one token
    (dict(top_p=0.5), {0, 1}),
    (dict(top_k=2, top_p=0.5), {0}),     # top_p counts mass renormalised over the top_k: 0.583
    (dict(min_p=0.3), {0, 1, 2}),        # drops p < 0.105
    (dict(min_p=0.25), {0, 1, 2, 3}),    # drops p < 0.0875
    (dict(top_k=5, top_p=0.9, min_p=0.5), {0, 1}),
    (dict(temperature=0.5, top_p=0.5), {0}),   # sharper: 0.35^2 / sum p^2 = 0.545 >= 0.5
])
def test_filters_keep_exactly_the_expected_tokens(params, kept):
    assert support(SamplingParams(**params)) == kept


def test_temperature_divides_logits_and_filters_renormalise_nothing_else():
    probs = filtered_probs(LOGITS[None].clone(), [SamplingParams(temperature=2.0, top_k=4)])[0]
    expected = (LOGITS[:4] / 2).softmax(-1)
    assert torch.allclose(probs[:4], expected) and probs[4:].tolist() == [0.0] * 4


def reference_mask(logits, top_k, top_p):
    """Per-row Python reference: top_k best, then the best-first set reaching top_p."""
    out = torch.ones_like(logits, dtype=torch.bool)
    for r, row in enumerate(logits):
        order = row.argsort(descending=True)[:top_k[r]]
        probs, mass = row[order].softmax(-1).tolist(), 0.0
        for token, p in zip(order.tolist(), probs):
            if top_p[r] < 1 and mass >= top_p[r]:
                break
            out[r, token], mass = False, mass + p
    return out


@pytest.mark.parametrize("scale, widths", [(6.0, [5]), (0.2, [5, 10])])
def test_top_k_top_p_sorts_whole_rows_only_when_the_prefix_is_short(monkeypatch, scale, widths):
    monkeypatch.setattr(sampler, "_PREFIX", 4)
    seen, real = [], sampler._sorted_drop
    monkeypatch.setattr(sampler, "_sorted_drop",
                        lambda vals, *rest: seen.append(vals.shape[1]) or real(vals, *rest))
    logits = torch.randn(4, 10, generator=torch.Generator().manual_seed(0)) * scale
    top_k = torch.tensor([10, 5, 10, 3])  # 10 = off; the widest real top_k (5) sets the prefix
    top_p = torch.tensor([0.6, 0.9, 0.5, 1.0])
    assert torch.equal(top_k_top_p_mask(logits, top_k, top_p), reference_mask(logits, top_k, top_p))
    assert seen == widths


def test_draws_stay_in_the_support_and_follow_the_probabilities():
    n = 20_000
    params = SamplingParams(top_k=4)
    drawn = tokens(sample(LOGITS.expand(n, -1), [SamplerInput(params, 0, [], [], ())] * n,
                          torch.Generator().manual_seed(0)))
    freq = torch.bincount(torch.tensor(drawn), minlength=8) / n
    expected = torch.tensor(PROBS[:4] + [0.0] * 4) / sum(PROBS[:4])
    assert set(drawn) == {0, 1, 2, 3}
    assert (freq - expected).abs().max() < 0.015


@pytest.mark.parametrize("vocab", [1000, 1013])  # 16-token vectors, then a scalar tail
def test_the_cpu_race_picks_what_the_torch_race_picks_and_never_a_token_without_mass(vocab):
    g = torch.Generator().manual_seed(vocab)
    probs = torch.rand(64, vocab, generator=g) ** 4
    probs[:, ::3] = 0.0  # every third token has no mass
    keys = torch.randint(0, 1 << 62, (64,), generator=g)
    fast = race.race(probs, keys)
    assert fast.tolist() == race.race_torch(probs, keys).tolist()
    assert (fast % 3 != 0).all() and fast.max() < vocab


def test_the_race_is_a_function_of_the_key_alone():
    probs = torch.ones(3, 5000)
    keys = torch.tensor([7, 7, 8])
    first = race.race(probs, keys).tolist()
    assert first[0] == first[1] != first[2]
    assert race.race(probs[:1], keys[:1]).tolist() == first[:1]  # the batch around it is irrelevant


# ---- seeded draws ----------------------------------------------------------------------------

FLAT = torch.zeros(10)


def seeded_run(rows_before: int, rows_after: int, position: int, batch_seed: int) -> int:
    """The token a seed=7 row draws at `position` with other rows around it."""
    others = [inp(seed=100 + i, position=position + i) for i in range(rows_before)]
    others += [inp(position=position) for _ in range(rows_after)]
    me = inp(seed=7, position=position)
    inputs = others[:rows_before] + [me] + others[rows_before:]
    logits = torch.randn(len(inputs), 10, generator=torch.Generator().manual_seed(batch_seed))
    logits[rows_before] = FLAT
    results = sample(logits, inputs, torch.Generator().manual_seed(batch_seed))
    return results[rows_before].token_id


def test_seeded_row_draws_the_same_alone_or_anywhere_in_any_batch():
    for position in range(12):
        alone = seeded_run(0, 0, position, batch_seed=0)
        for before, after, batch_seed in [(0, 3, 1), (2, 0, 2), (3, 4, 3), (1, 1, 4)]:
            assert seeded_run(before, after, position, batch_seed) == alone


def test_seeded_draws_vary_with_position_and_seed():
    by_position = [sample(FLAT[None], [inp(seed=7, position=p)])[0].token_id for p in range(20)]
    other_seed = [sample(FLAT[None], [inp(seed=8, position=p)])[0].token_id for p in range(20)]
    assert len(set(by_position)) > 3 and by_position != other_seed


def test_unseeded_rows_follow_the_generator():
    inputs = [inp() for _ in range(8)]
    logits = FLAT.expand(8, -1)
    first = tokens(sample(logits, inputs, torch.Generator().manual_seed(5)))
    assert tokens(sample(logits, inputs, torch.Generator().manual_seed(5))) == first
    assert tokens(sample(logits, inputs, torch.Generator().manual_seed(6))) != first


# ---- logprobs --------------------------------------------------------------------------------

def test_logprobs_are_raw_log_softmax_and_top_list_is_sorted():
    logits = torch.tensor([[1.0, 3.0, -2.0, 0.5, 2.0, 0.0, 4.0, -1.0]])
    # penalties, temperature, top_k and min_tokens all act, yet logprobs stay raw
    [r] = sample(logits, [inp(output=[6], eos=(6,), min_tokens=2, repetition_penalty=3.0,
                              temperature=0.5, top_k=2, seed=0, logprobs=3)])
    raw = logits[0].log_softmax(-1)
    assert r.token_id in (1, 4)
    assert r.logprob == pytest.approx(raw[r.token_id].item())
    assert [t for t, _ in r.top_logprobs] == [6, 1, 4]
    assert [v for _, v in r.top_logprobs] == pytest.approx(raw[[6, 1, 4]].tolist())
    assert math.isclose(sum(math.exp(v) for v in raw.tolist()), 1.0, rel_tol=1e-6)


def test_logprobs_zero_gives_the_chosen_logprob_and_no_top_list():
    logits = torch.tensor([[1.0, 3.0, -2.0, 0.5, 2.0, 0.0]])
    [r, plain, many] = sample(logits.repeat(3, 1), [inp(temperature=0, logprobs=0),
                                                    inp(temperature=0),
                                                    inp(temperature=0, logprobs=20)])
    assert r.token_id == 1 and r.top_logprobs == []
    assert r.logprob == pytest.approx(logits[0].log_softmax(-1)[1].item())
    assert plain.logprob is None and plain.top_logprobs == []
    assert [t for t, _ in many.top_logprobs] == [1, 4, 0, 3, 5, 2]  # capped at the vocabulary


# ---- scale -----------------------------------------------------------------------------------

def test_full_vocab_mixed_batch():
    vocab, batch = 152_064, 64
    logits = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(0)) * 3
    kinds = [dict(temperature=0), dict(seed=1), dict(top_k=50, top_p=0.9), dict(top_p=0.8),
             dict(min_p=0.05, temperature=0.7), dict(repetition_penalty=1.1, frequency_penalty=0.5,
                                                     presence_penalty=0.5, logprobs=5),
             dict(min_tokens=200, stop_token_ids=[3, 4]), dict(top_k=20, seed=9)]
    inputs = [inp(position=500 + i, prompt=range(i, 400 + i), output=range(i * 7, i * 7 + 100),
                  eos=(151645,), **kinds[i % len(kinds)]) for i in range(batch)]
    results = sample(logits, inputs, torch.Generator().manual_seed(0))
    assert len(results) == batch and all(0 <= r.token_id < vocab for r in results)
    # min_tokens rows never pick their stop ids; greedy rows pick the argmax
    assert all(r.token_id not in (3, 4, 151645) for r in results[6::8])
    assert [r.token_id for r in results[0::8]] == logits[0::8].argmax(-1).tolist()

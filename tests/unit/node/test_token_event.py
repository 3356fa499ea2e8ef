"""One conversion of a sequence's progress into the wire's TokenEvent, for prefill, decode and
the colocated engine alike."""
import torch

from qwenvl_pd.engine.sequence import Sequence, Status
from qwenvl_pd.finish_reason import FinishReason
from qwenvl_pd.messages import SampledToken, TokenEvent
from qwenvl_pd.node.requests import token_event
from qwenvl_pd.sampling_params import SamplingParams


def _seq(outputs: list[int], reason: FinishReason | None = None) -> Sequence:
    seq = Sequence("r", [5, 6, 7], torch.zeros(3, 3, dtype=torch.long), 0, SamplingParams(logprobs=1))
    seq.token_ids += outputs
    seq.logprobs = [(-0.5 * (i + 1), [(t, -0.1)]) for i, t in enumerate(outputs)]
    seq.num_cached = 2
    if reason is not None:
        seq.status, seq.finish_reason = Status.FINISHED, reason
    return seq


def test_a_running_token_carries_its_logprobs_and_counts():
    assert token_event(_seq([11, 12])) == TokenEvent(SampledToken(12, -1.0, ((12, -0.1),)), "", 3, 2)


def test_a_samples_first_event_carries_the_prefix_cache_hits():
    event = token_event(_seq([11]), first=True)
    assert (event.token.token_id, event.num_cached_tokens, event.prompt_logprobs) == (11, 2, None)


def test_an_end_by_stop_or_length_keeps_its_token():
    assert token_event(_seq([11, 12], FinishReason.LENGTH)).finish_reason == "length"
    assert token_event(_seq([11, 12], FinishReason.STOP)).token.token_id == 12


def test_abort_and_hand_back_end_without_a_token():
    for reason in (FinishReason.ABORT, FinishReason.PREEMPTED):
        assert token_event(_seq([11], reason)) == TokenEvent(None, reason.value, 3, 1)


def test_prefilled_is_no_end_on_the_wire():  # decode goes on with the request
    event = token_event(_seq([11], FinishReason.PREFILLED), first=True)
    assert (event.finish_reason, event.token.token_id, event.num_cached_tokens) == ("", 11, 2)

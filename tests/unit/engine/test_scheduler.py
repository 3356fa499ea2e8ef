"""Scheduler decisions with exact block ids, chunk sizes and preemption order."""
import pytest
import torch

from qwenvl_pd.engine.block_manager import BlockManager, block_hashes
from qwenvl_pd.engine.scheduler import Scheduler, SchedulerConfig
from qwenvl_pd.engine.sequence import FinishReason, Sequence, Status, TokenSpan
from qwenvl_pd.sampling_params import SamplingParams


def _seq(name: str, n: int, first: int = 1) -> Sequence:
    ids = list(range(first, first + n))
    return Sequence(name, ids, torch.arange(n).expand(3, n), 0, SamplingParams(max_tokens=100))


def _advance(chunks, token: int = 999) -> None:
    """What the engine does after a forward: mark computed, append a token at the end."""
    for c in chunks:
        c.seq.num_computed += c.num_tokens
        if c.seq.num_computed == len(c.seq.token_ids):
            c.seq.token_ids.append(token)


def _plan(chunks):
    return [(c.seq.request_id, c.num_tokens) for c in chunks]


def test_chunked_prefill_under_the_token_budget():
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=8), BlockManager(16, 4))
    a, b = _seq("a", 10), _seq("b", 10, first=100)
    sched.add(a), sched.add(b)
    first = sched.schedule()
    assert _plan(first) == [("a", 8)]
    assert a.block_ids == [0, 1, 2]
    _advance(first)
    second = sched.schedule()
    assert _plan(second) == [("a", 2), ("b", 6)]
    assert b.block_ids == [3, 4, 5]
    _advance(second)
    assert len(a.token_ids) == 11 and len(b.token_ids) == 10
    assert _plan(sched.schedule()) == [("a", 1), ("b", 4)]


def test_max_num_seqs_bounds_the_running_set():
    sched = Scheduler(SchedulerConfig(max_num_seqs=2), BlockManager(16, 4))
    for i in range(3):
        sched.add(_seq(str(i), 3, first=10 * i + 1))
    assert _plan(sched.schedule()) == [("0", 3), ("1", 3)]
    assert [s.request_id for s in sched.waiting] == ["2"]


def test_admission_waits_for_free_blocks():
    blocks = BlockManager(4, 4)
    sched = Scheduler(SchedulerConfig(), blocks)
    sched.add(_seq("a", 12)), sched.add(_seq("b", 8, first=50))
    assert _plan(sched.schedule()) == [("a", 12)]
    assert blocks.num_free_blocks == 1
    assert [s.request_id for s in sched.waiting] == ["b"]


def test_decode_growth_preempts_the_newest_and_recomputes_it():
    blocks = BlockManager(4, 4)
    sched = Scheduler(SchedulerConfig(), blocks)
    a, b = _seq("a", 7), _seq("b", 8, first=50)
    sched.add(a), sched.add(b)
    _advance(sched.schedule())            # a: 7+1 tokens in [0, 1]; b: 8+1 in [2, 3]
    assert (a.block_ids, b.block_ids) == ([0, 1], [2, 3])
    chunks = sched.schedule()             # b's 9th token needs a 3rd block: none free
    assert _plan(chunks) == [("a", 1)]
    assert sched.num_preemptions == 1
    assert b.status == Status.WAITING and b.block_ids == [] and b.num_computed == 0
    assert list(sched.waiting) == [b]
    assert b.token_ids[-1] == 999         # the generated token survives to be recomputed
    _advance(chunks)
    chunks = sched.schedule()             # a grows into block 2 (next to its run)
    assert _plan(chunks) == [("a", 1)] and a.block_ids == [0, 1, 2]


def test_decode_mode_hands_preempted_requests_back():
    blocks = BlockManager(4, 4)
    sched = Scheduler(SchedulerConfig(recompute_on_preempt=False), blocks)
    a, b = _seq("a", 8), _seq("b", 8, first=50)
    for s in (a, b):
        s.block_ids = blocks.allocate_n(2)
        s.token_ids.append(7)             # the first token came from prefill
        sched.add_prefilled(s)
    assert (a.num_computed, b.num_computed) == (8, 8)
    assert _plan(sched.schedule()) == [("a", 1)]
    assert sched.handed_back == [b] and b.finish_reason == FinishReason.PREEMPTED
    assert blocks.num_used_blocks == 3


def test_finish_frees_blocks_unless_kept():
    blocks = BlockManager(8, 4, enable_prefix_caching=False)
    sched = Scheduler(SchedulerConfig(), blocks)
    a, b = _seq("a", 5), _seq("b", 5, first=50)
    sched.add(a), sched.add(b)
    sched.schedule()
    sched.finish(a, FinishReason.STOP)
    sched.finish(b, FinishReason.PREFILLED, keep_blocks=True)
    assert a.block_ids == [] and b.block_ids == [2, 3]
    assert [blocks.ref_count(i) for i in range(4)] == [0, 0, 1, 1]
    assert not sched.has_work()


def test_seal_hashes_each_block_once_as_it_fills_and_later_prompts_hit_it():
    blocks = BlockManager(16, 4)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=6), blocks)
    a = _seq("a", 10)
    sched.add(a)
    for _ in range(4):                    # 6 + 4 prompt tokens, then 2 decode steps
        chunks = sched.schedule()
        _advance(chunks, token=50 + a.num_output)
        sched.seal(chunks)
    assert a.num_computed == 12 and len(a.block_hashes) == 3
    assert a.block_hashes == block_hashes(a.token_ids[:12], [], 4)
    b = _seq("b", 13)
    b.token_ids[10:12] = a.token_ids[10:12]  # the same 12 tokens, then one more
    sched.add(b)
    sched.schedule()
    assert b.num_cached == 12 and b.block_ids[:3] == a.block_ids[:3] == [0, 1, 2]


def test_token_span_reads_the_list_in_place():
    tokens = [5, 6, 7, 8]
    span = TokenSpan(tokens, 1, 3)
    assert (len(span), list(span), span[0], span[-1], span[::-1]) == (2, [6, 7], 6, 7, [7, 6])
    with pytest.raises(IndexError):
        span[2]
    tokens.append(9)  # the span keeps the length it was made with
    assert list(TokenSpan(tokens, 2)) == [7, 8, 9] and len(span) == 2


def test_prompts_join_a_step_only_while_it_is_below_the_fill():
    # fill 8 of a 20-token budget: prompts join while the step holds < 8 tokens; a long one
    # still gets the whole budget, and running decodes count toward the fill
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=20, fill_tokens=8), BlockManager(64, 4))
    for name, n in (("a", 3), ("b", 4), ("c", 5), ("d", 30), ("e", 2)):
        sched.add(_seq(name, n, first=100 * ord(name)))
    first = sched.schedule()
    assert _plan(first) == [("a", 3), ("b", 4), ("c", 5)]  # 7 < 8 lets c in; 12 stops d
    _advance(first)
    assert _plan(sched.schedule()) == [("a", 1), ("b", 1), ("c", 1), ("d", 17)]
    assert [s.request_id for s in sched.waiting] == ["e"]


def test_without_a_fill_prompts_join_up_to_the_budget():
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=20), BlockManager(64, 4))
    for name, n in (("a", 3), ("b", 4), ("c", 5), ("d", 30)):
        sched.add(_seq(name, n, first=100 * ord(name)))
    assert _plan(sched.schedule()) == [("a", 3), ("b", 4), ("c", 5), ("d", 8)]

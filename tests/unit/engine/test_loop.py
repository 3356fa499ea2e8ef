"""The engine thread: commands whose caller went away before they ran are skipped; an error
reaches its caller and the loop goes on."""
import threading

import pytest
import torch

from qwenvl_pd import LLM, SamplingParams
from qwenvl_pd.engine.block_manager import OutOfBlocks
from qwenvl_pd.engine.commands import Abort, Add, FreeBlocks, ReserveBlocks, StepResult
from qwenvl_pd.engine.loop import EngineLoop
from qwenvl_pd.engine.sequence import Sequence


@pytest.fixture(scope="module")
def engine(tiny_dirs):
    return LLM(str(tiny_dirs["qwen2_5_vl"]), max_model_len=256).engine


def _seq(rid: str, max_tokens: int = 3) -> Sequence:
    tokens = list(range(100, 120))
    return Sequence(rid, tokens, torch.arange(len(tokens)).expand(3, -1).clone(), 0,
                    SamplingParams(max_tokens=max_tokens, temperature=0))


def test_a_submission_cancelled_before_it_ran_is_skipped(engine):
    loop = EngineLoop(engine, on_step=lambda result: None)
    gone = loop.submit(ReserveBlocks(2))
    kept = loop.submit(ReserveBlocks(1))
    assert gone.cancel()  # before the thread started: it must never run
    loop.start()
    try:
        blocks = kept.result(timeout=10)
        assert len(blocks) == 1 and gone.cancelled()
        assert engine.load().blocks_used == 1  # the cancelled reservation took nothing
        assert loop.submit(FreeBlocks(blocks)).result(timeout=10) is None
        assert engine.load().blocks_used == 0
    finally:
        loop.stop()


def test_an_error_reaches_the_caller_and_the_loop_goes_on(engine):
    loop = EngineLoop(engine, on_step=lambda result: None)
    loop.start()
    try:
        with pytest.raises(OutOfBlocks):
            loop.submit(ReserveBlocks(10 ** 6)).result(timeout=10)
        assert loop.submit(Abort("nobody")).result(timeout=10) is None
        assert engine.load().blocks_used == 0
        assert loop.failure is None
    finally:
        loop.stop()


def test_steps_report_every_token_and_the_end_of_each_sequence(engine):
    results: list[StepResult] = []
    ended = threading.Event()

    def on_step(result: StepResult) -> None:
        results.append(result)
        if result.finished:
            ended.set()
    loop = EngineLoop(engine, on_step=on_step)
    seq = _seq("steps")
    loop.start()
    try:
        loop.submit(Add(seq)).result(timeout=10)
        assert ended.wait(timeout=30)
    finally:
        loop.stop()
    sampled = [r.sampled for r in results if r.sampled]
    assert sampled == [(seq,)] * 3  # prefill's token, then two decode tokens
    assert [r.finished for r in results if r.finished] == [(seq,)]
    assert seq.finish_reason.value == "length" and engine.load().blocks_used == 0


def test_a_request_id_runs_once_and_abort_ends_it(engine):
    seq = _seq("dup", max_tokens=50)
    engine.add(seq)
    with pytest.raises(KeyError):
        engine.add(_seq("dup"))
    assert engine.abort("dup") is seq and seq.finish_reason.value == "abort"
    assert engine.abort("dup") is None and engine.load().blocks_used == 0
    assert not engine.has_work()

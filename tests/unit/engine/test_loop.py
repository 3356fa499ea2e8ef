"""The engine thread: work whose caller went away before it started is skipped."""
import threading

import pytest

from qwenvl_pd import LLM
from qwenvl_pd.engine.loop import EngineLoop


@pytest.fixture(scope="module")
def engine(tiny_dirs):
    return LLM(str(tiny_dirs["qwen2_5_vl"]), max_model_len=256).engine


def test_a_submission_cancelled_before_it_ran_is_skipped(engine):
    loop = EngineLoop(engine, on_tokens=lambda seqs: None)
    ran: list[str] = []
    gate = threading.Event()
    blocker = loop.submit(gate.wait)  # holds the thread while the next two queue up
    gone = loop.submit(lambda: ran.append("gone"))
    kept = loop.submit(lambda: ran.append("kept") or 7)
    loop.start()
    try:
        assert gone.cancel()
        gate.set()
        assert kept.result(timeout=10) == 7 and blocker.result(timeout=10) is True
        assert ran == ["kept"] and gone.cancelled()
    finally:
        loop.stop()


def test_an_error_reaches_the_caller_and_the_loop_goes_on(engine):
    loop = EngineLoop(engine, on_tokens=lambda seqs: None)
    loop.start()
    try:
        with pytest.raises(KeyError):
            loop.submit(lambda: {}["x"]).result(timeout=10)
        assert loop.submit(lambda: engine.blocks.num_used_blocks).result(timeout=10) == 0
        assert loop.failure is None
    finally:
        loop.stop()

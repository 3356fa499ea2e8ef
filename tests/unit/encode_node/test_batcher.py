"""The encode worker's batching: everything waiting goes in one batch up to the token budget,
and a caller asking for a queued key waits on that job instead of adding one."""
import threading

from qwenvl_pd.encode_node.batcher import EncodeBatcher
from qwenvl_pd.messages import MediaItem

ITEM = MediaItem(kind="image", content_hash="h", grid_thw=(1, 2, 2), data=b"x")


class Recorder:
    """The batches `run` got; the first one blocks until released, so the rest queue up."""

    def __init__(self):
        self.batches: list[list[tuple[str, int]]] = []
        self.started, self.release = threading.Event(), threading.Event()

    def __call__(self, jobs):
        self.batches.append([(j.key, len(j.waiters)) for j in jobs])
        self.started.set()
        self.release.wait(10)
        for job in jobs:
            for _, fut in job.waiters:
                fut.set_result(job.key)


def test_waiting_jobs_share_one_batch_within_the_token_budget():
    rec = Recorder()
    batcher = EncodeBatcher(rec, max_tokens=20)
    first, _ = batcher.submit("a", ITEM, 5, 30)
    assert rec.started.wait(10)
    futures = [batcher.submit(k, ITEM, n, 30) for k, n in (("b", 10), ("c", 10), ("b", 10), ("d", 1))]
    assert [joined for _, joined in futures] == [False, False, True, False]
    assert batcher.waiting == 3
    rec.release.set()
    assert [f.result(10) for f, _ in futures] == ["b", "c", "b", "d"]
    assert first.result(10) == "a"
    batcher.stop()
    assert rec.batches == [[("a", 1)], [("b", 2), ("c", 1)], [("d", 1)]]


def test_an_item_over_the_budget_still_runs_alone():
    rec = Recorder()
    rec.release.set()
    batcher = EncodeBatcher(rec, max_tokens=4)
    assert batcher.submit("big", ITEM, 9, 30)[0].result(10) == "big"
    batcher.stop()
    assert rec.batches == [[("big", 1)]]


def test_a_failing_batch_fails_its_callers_and_the_worker_goes_on():
    calls = []

    def run(jobs):
        calls.append([j.key for j in jobs])
        if jobs[0].key == "bad":
            raise RuntimeError("tower failed")
        for job in jobs:
            job.waiters[0][1].set_result("ok")
    batcher = EncodeBatcher(run, max_tokens=100)
    bad, _ = batcher.submit("bad", ITEM, 1, 30)
    assert isinstance(bad.exception(10), RuntimeError)
    assert batcher.submit("good", ITEM, 1, 30)[0].result(10) == "ok"
    batcher.stop()
    assert calls == [["bad"], ["good"]]

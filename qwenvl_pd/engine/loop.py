"""Runs an LLMEngine on its own thread; gRPC handlers talk to it only through submit()."""
import logging
import queue
import threading
from concurrent.futures import Future
from typing import Callable

from qwenvl_pd.engine.llm_engine import LLMEngine
from qwenvl_pd.engine.sequence import Sequence

log = logging.getLogger(__name__)
IDLE_WAIT_S = 0.05  # how often an idle loop still ticks (lease expiry)


class EngineLoop:
    """The engine, its block manager and its sequences are touched by this thread alone."""

    def __init__(self, engine: LLMEngine, on_tokens: Callable[[list[Sequence]], None],
                 on_tick: Callable[[], None] = lambda: None):
        self.engine = engine
        self._on_tokens, self._on_tick = on_tokens, on_tick
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._stopped = threading.Event()
        self.failure: str | None = None  # why the loop stopped on its own
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._inbox.put(None)
        self._thread.join(timeout=10)

    def submit(self, fn: Callable[[], object]) -> Future:
        """Run fn on the engine thread between steps; the future holds its result or error.
        Cancelling the future before fn started skips fn: its caller went away."""
        fut: Future = Future()
        self._inbox.put((fn, fut))
        return fut

    def _run(self) -> None:
        while not self._stopped.is_set():
            self._drain(wait=not self.engine.has_work())
            self._on_tick()
            if self.engine.has_work():
                try:
                    self._on_tokens(self.engine.step())
                except Exception as e:  # a broken step must not kill the node silently
                    log.exception("engine step failed")
                    self.failure = f"engine step failed: {e}"
                    self._stopped.set()

    def _drain(self, wait: bool) -> None:
        try:
            item = self._inbox.get(timeout=IDLE_WAIT_S) if wait else self._inbox.get_nowait()
        except queue.Empty:
            return
        while item is not None:
            self._run_one(*item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    @staticmethod
    def _run_one(fn: Callable[[], object], fut: Future) -> None:
        if not fut.set_running_or_notify_cancel():
            return  # cancelled while queued
        try:
            fut.set_result(fn())
        except Exception as e:  # handed to the caller through the future
            fut.set_exception(e)

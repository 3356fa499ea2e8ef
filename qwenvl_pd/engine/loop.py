"""Runs an LLMEngine on its own thread; callers talk to it only through commands (submit)."""
import logging
import queue
import threading
from concurrent.futures import Future
from typing import Callable

from qwenvl_pd.engine.commands import Abort, Add, Command, FreeBlocks, JoinPrefilled, ReserveBlocks, StepResult
from qwenvl_pd.engine.llm_engine import LLMEngine

log = logging.getLogger(__name__)
IDLE_WAIT_S = 0.05  # how often an idle loop wakes up (to notice stop)


class EngineLoop:
    """The engine, its block manager and its sequences are touched by this thread alone.
    on_step gets each step's result on this thread: it should hand it on, not block."""

    def __init__(self, engine: LLMEngine, on_step: Callable[[StepResult], None]):
        self.engine = engine
        self._on_step = on_step
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

    def submit(self, command: Command) -> Future:
        """Run command on the engine thread between steps; the future holds its result or error.
        Cancelling the future before it ran skips it: its caller went away."""
        fut: Future = Future()
        self._inbox.put((command, fut))
        return fut

    def _run(self) -> None:
        while not self._stopped.is_set():
            self._drain(wait=not self.engine.has_work())
            if self.engine.has_work():
                try:
                    self._on_step(self.engine.step())
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

    def _run_one(self, command: Command, fut: Future) -> None:
        if not fut.set_running_or_notify_cancel():
            return  # cancelled while queued
        try:
            fut.set_result(self._execute(command))
        except Exception as e:  # handed to the caller through the future
            fut.set_exception(e)

    def _execute(self, command: Command):
        """The one place a command becomes an engine call."""
        engine = self.engine
        match command:
            case Add(seq, max_waiting, stream_layers):
                return engine.add(seq, max_waiting, stream_layers)
            case JoinPrefilled(seq):
                return engine.join_prefilled(seq)
            case Abort(request_id):
                return engine.abort(request_id)
            case ReserveBlocks(n, max_waiting):
                return engine.reserve_blocks(n, max_waiting)
            case FreeBlocks(block_ids):
                return engine.free_blocks(block_ids)
        raise TypeError(f"not an engine command: {command!r}")

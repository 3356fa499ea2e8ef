"""What crosses the engine thread's edge: the commands a node sends it (run by EngineLoop
between steps, in arrival order), and what comes back (a step's result, the load, the errors).

Commands are data, not code: the loop dispatches them in one place (EngineLoop._execute), so the
operations a node may perform on an engine are exactly these.
"""
from __future__ import annotations

from dataclasses import dataclass

from qwenvl_pd.engine.sequence import Sequence


class QueueFull(RuntimeError):
    """The waiting queue is at its bound: the caller should go elsewhere or come back later."""


class DuplicateRequest(KeyError):
    """A sequence of this request id is already running on the engine."""


@dataclass(frozen=True)
class Add:
    """Queue seq for prefill (LLMEngine.add)."""
    seq: Sequence
    max_waiting: int | None = None  # refuse (QueueFull) once this many wait; None: no bound
    stream_layers: bool = False  # report its layer-wise KV progress (prefill's KVStreams)


@dataclass(frozen=True)
class JoinPrefilled:
    """Decode: seq's prompt KV sits in seq.block_ids already; it joins the running batch."""
    seq: Sequence


@dataclass(frozen=True)
class Abort:
    """End a live request now -> its finished Sequence, or None if none is live."""
    request_id: str


@dataclass(frozen=True)
class ReserveBlocks:
    """n free blocks for a KV read -> their ids (OutOfBlocks, QueueFull)."""
    n: int
    max_waiting: int | None = None


@dataclass(frozen=True)
class FreeBlocks:
    """Give back blocks that no sequence owns (a read's reservation, a prefill's lease)."""
    block_ids: tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "block_ids", tuple(self.block_ids))


Command = Add | JoinPrefilled | Abort | ReserveBlocks | FreeBlocks


@dataclass(frozen=True)
class StepResult:
    """What one engine step produced."""
    sampled: tuple[Sequence, ...] = ()  # got a token this step (those that finished included)
    finished: tuple[Sequence, ...] = ()  # of sampled, those that ended with it
    handed_back: tuple[Sequence, ...] = ()  # decode: preempted for lack of blocks, never to resume here


@dataclass(frozen=True)
class EngineLoad:
    """The engine's counters; read from any thread (a snapshot, perhaps a step old)."""
    running: int
    waiting: int
    blocks_used: int
    blocks_total: int
    prefix_cache_queries: int  # in blocks
    prefix_cache_hits: int  # in blocks
    requests_total: int  # requests admitted since start (added or joined)

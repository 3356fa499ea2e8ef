"""Why a request ended: one type for the engine (Sequence.finish_reason) and the wire
(PrefillResult / TokenEvent carry its value; "" while a request runs)."""
from enum import Enum


class FinishReason(str, Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"           # the proxy: the request failed after its first token
    PREEMPTED = "preempted"   # decode mode: out of blocks, handed back to be prefilled again
    PREFILLED = "prefilled"   # prefill mode: first token sampled, blocks kept for the handoff

    @classmethod
    def on_the_wire(cls) -> tuple[str, ...]:
        """The values a TokenEvent may carry: "" (running) and every end but PREFILLED, which
        never leaves the prefill node."""
        return ("",) + tuple(r.value for r in cls if r is not cls.PREFILLED)

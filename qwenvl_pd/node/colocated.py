"""The colocated baseline: one engine that prefills and decodes, behind the same OpenAI app.

`qwenvl-pd serve --colocated` uses it, so PD and colocated are measured through one proxy, one
tokenizer and one protocol path; only where the tokens are computed differs. The engine runs on
its own thread (engine/loop.py), exactly as inside a node. A request it cannot serve raises
errors.InvalidRequest, which the proxy maps at its edge.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from qwenvl_pd.engine.commands import Abort, Add, StepResult
from qwenvl_pd.engine.loop import EngineLoop
from qwenvl_pd.engine.sequence import Sequence
from qwenvl_pd.engine.stack import StackConfig, build_stack
from qwenvl_pd.errors import InvalidRequest
from qwenvl_pd.messages import ModelInfo, PrefillRequest, TokenEvent
from qwenvl_pd.model.inputs import InputError
from qwenvl_pd.node.model_info import model_info
from qwenvl_pd.node.requests import sequence_from_request, token_event


class ColocatedBackend:
    def __init__(self, cfg: StackConfig):
        self.stack = build_stack(cfg)
        try:
            self.stack.engine.check_pool()
        except ValueError:
            self.stack.close()
            raise
        self.model_dir, self.max_model_len = cfg.model, self.stack.engine.cfg.max_model_len
        self.config, self.inputs, self.engine = self.stack.config, self.stack.inputs, self.stack.engine
        self.loop = EngineLoop(self.engine, self._on_step)
        self.queues: dict[str, asyncio.Queue] = {}
        self.aio: asyncio.AbstractEventLoop | None = None

    def model_info(self) -> ModelInfo:
        return model_info(self.model_dir, self.config, self.max_model_len)

    def start(self) -> None:
        self.aio = asyncio.get_running_loop()
        self.loop.start()

    def ready(self) -> bool:
        return True

    # ---- engine thread
    def _on_step(self, result: StepResult) -> None:
        for seq in result.sampled:
            event = token_event(seq, first=seq.num_output == 1)
            self.aio.call_soon_threadsafe(self._publish, seq.request_id, event)

    def _publish(self, request_id: str, event: TokenEvent) -> None:
        queue = self.queues.get(request_id)
        if queue is not None:
            queue.put_nowait(event)

    def _sequence(self, req: PrefillRequest) -> Sequence:
        try:
            return sequence_from_request(self.inputs, req, self.max_model_len, self.engine.grammars)
        except (ValueError, InputError) as e:
            raise InvalidRequest(str(e)) from None

    async def generate(self, req: PrefillRequest, key: bytes) -> AsyncIterator[TokenEvent]:
        seq = await asyncio.to_thread(self._sequence, req)
        queue = self.queues[req.request_id] = asyncio.Queue()
        await asyncio.wrap_future(self.loop.submit(Add(seq)))
        finished = False
        try:
            while not finished:
                event = await queue.get()
                finished = bool(event.finish_reason)
                yield event
        finally:
            self.queues.pop(req.request_id, None)
            if not finished:  # a stop string or a client that left: free the blocks now
                self.loop.submit(Abort(req.request_id))

    def stop(self) -> None:
        self.loop.stop()
        self.stack.close()


def colocated_opener(stack: StackConfig):
    """The proxy's open_backend (proxy/cluster/interface.py) for one colocated engine built from
    `stack`; the proxy's config and metrics are not needed here."""
    async def open_colocated(cfg, metrics):
        return await _open(stack)
    return open_colocated


async def _open(stack: StackConfig):
    backend = await asyncio.to_thread(ColocatedBackend, stack)
    backend.start()

    async def close() -> None:
        backend.stop()
    return backend, backend.model_info(), close

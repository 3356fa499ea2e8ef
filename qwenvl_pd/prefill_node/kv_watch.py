"""The asyncio side of layer-wise KV streaming on prefill: each streaming request's latest
progress, for PrefillStream's announce and for WatchKV's readers.

Progress is cumulative, so a reader that connects late (or is slow) gets the latest state, not
every report: WatchKV yields the state whenever it changed since the reader's last message.
"""
from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

from qwenvl_pd.engine.kv_streams import LayerProgress
from qwenvl_pd.messages import KVProgress, PrefillResult


class Watched:
    """One streaming request: announced block ids, progress, and how it ended."""

    def __init__(self):
        self.announced: asyncio.Future = asyncio.get_running_loop().create_future()
        self.progress = KVProgress(tokens_ready=0)
        self.end: str | None = None  # None while computing; "" with a result; else why it failed
        self._version = 0
        self._changed = asyncio.Event()

    def update(self, p: LayerProgress) -> None:
        if p.block_ids and not self.announced.done():
            self.announced.set_result(p.block_ids)
        if self.end is None:
            self.progress = KVProgress(p.tokens_ready, p.chunk_tokens, p.layers_ready)
            self._bump()

    def finish(self, result: PrefillResult | None, error: str = "") -> None:
        """The last state: the result (first token, leased handle), or why there is none."""
        if self.end is not None:
            return
        if result is not None:
            n = result.prompt_len
            self.progress = dataclasses.replace(self.progress, tokens_ready=n, chunk_tokens=n, result=result)
        self.end = "" if result is not None else (error or "ended without a result")
        self._bump()

    async def changes(self) -> AsyncIterator[KVProgress]:
        """The state now, then each new one, until the end (check `end` afterwards)."""
        seen = -1
        while True:
            if self._version != seen:  # checked again after each yield: the end may have come
                seen = self._version
                yield self.progress
                continue
            if self.end is not None:
                return
            await self._changed.wait()

    def _bump(self) -> None:
        self._version += 1
        self._changed.set()
        self._changed = asyncio.Event()

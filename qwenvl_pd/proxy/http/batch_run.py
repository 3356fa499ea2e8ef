"""Several prompts of one /v1/completions request: one RequestRun each, answered as one response.

OpenAI numbers the choices prompt by prompt: prompt k's sample i is choice k * n + i. The usage
adds up every prompt's tokens. Deltas of all prompts interleave as they come, as samples do.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Sequence

from qwenvl_pd.proxy.http.fan_in import fan_in
from qwenvl_pd.proxy.http.request_run import Delta, RequestRun
from qwenvl_pd.proxy.responses import usage


class BatchRun:
    """The RequestRun interface streaming.py reads (n, tools, want_logprobs, deltas, usage) over
    several runs of the same sampling parameters."""

    def __init__(self, runs: Sequence[RequestRun]):
        self.runs = list(runs)
        self.per = runs[0].n
        self.tools, self.want_logprobs = runs[0].tools, runs[0].want_logprobs

    @property
    def n(self) -> int:
        return self.per * len(self.runs)

    def usage(self) -> dict:
        parts = [r.usage() for r in self.runs]
        cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in parts)
        return usage(sum(u["prompt_tokens"] for u in parts), sum(u["completion_tokens"] for u in parts),
                     cached)

    def deltas(self) -> AsyncIterator[Delta]:
        """Every run's deltas renumbered; an error of any run ends the whole request."""
        return fan_in([self._renumbered(k, r) for k, r in enumerate(self.runs)])

    async def _renumbered(self, k: int, run: RequestRun) -> AsyncIterator[Delta]:
        async with contextlib.aclosing(run.deltas()) as deltas:
            async for d in deltas:
                yield dataclasses.replace(d, index=k * self.per + d.index)

"""One OpenAI request = n independent samples; token events -> text deltas, usage and metrics.

Each sample is its own PD request (its own prefill, its own decode stream). Samples run as tasks
feeding one queue, so the client sees deltas in the order tokens arrive. Stop strings are applied
here, by the incremental detokenizer: a hit ends the sample, which cancels its decode stream.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from qwenvl_pd.errors import InvalidRequest
from qwenvl_pd.messages import PrefillRequest, SampledToken, TokenEvent
from qwenvl_pd.proxy.http.fan_in import fan_in
from qwenvl_pd.proxy.prompt.detokenizer import IncrementalDetokenizer
from qwenvl_pd.proxy.prompt.inputs import PreparedPrompt
from qwenvl_pd.proxy.metrics import ProxyMetrics
from qwenvl_pd.proxy.errors import bad_request, server_error
from qwenvl_pd.proxy.prompt.model_info import ProxyModel
from qwenvl_pd.proxy.prompt.prompt_logprobs import echo_entries, ranked
from qwenvl_pd.proxy.responses import PromptLogprobList, TokenLogprob, TopLogprob, usage
from qwenvl_pd.proxy.cluster.interface import Backend
from qwenvl_pd.proxy.cluster.router import affinity_key
from qwenvl_pd.proxy.tools import Tools

SEED_STRIDE = 7919  # n samples of one seeded request differ by this, as in qwenvl_pd/llm.py
# Samples whose prefill (and so media bytes) is in flight at once. Each sample carries the media to
# prefill: all n at once held n serialized copies in the proxy and n decoded ones on prefill. One
# after another, the later ones also find the earlier's prompt in prefill's prefix cache.
MEDIA_PREFILLS_AT_ONCE = 2


@dataclass(frozen=True)
class Delta:
    index: int  # which of the n choices
    text: str
    logprobs: tuple[TokenLogprob, ...] | None  # None: not requested
    finish_reason: str | None = None  # set on a choice's last delta
    prompt_logprobs: PromptLogprobList | None = None  # on a choice's first delta, when asked for
    tokens: int = 0  # the choice's completion tokens so far, this delta's included


@dataclass
class SampleStats:
    tokens: int = 0
    cached: int = 0
    first_token_at: float | None = None
    last_token_at: float | None = None
    gaps: list[float] = field(default_factory=list)
    finish_reason: str | None = None


def sample_requests(rid: str, prompt: PreparedPrompt) -> list[PrefillRequest]:
    sp, reqs = prompt.sampling, []
    for i in range(sp.n):
        seed = sp.seed + i * SEED_STRIDE if sp.seed is not None and sp.n > 1 else sp.seed
        params = dataclasses.replace(sp, n=1, seed=seed)
        reqs.append(PrefillRequest(request_id=f"{rid}-{i}", prompt_token_ids=prompt.token_ids,
                                   media=tuple(prompt.media), sampling=params,
                                   cache_salt=prompt.cache_salt))
    return reqs


class RequestRun:
    """Runs the samples of one request; iterate deltas(), then read usage()."""

    def __init__(self, rid: str, prompt: PreparedPrompt, model: ProxyModel, backend: Backend,
                 metrics: ProxyMetrics, want_logprobs: bool, affinity_tokens: int,
                 arrived: float | None = None, tools: Tools = Tools(), echo: str = "",
                 echo_logprobs: bool = False):
        self.echo = echo  # text put before each sample's first delta (completions' echo)
        self.echo_logprobs = echo_logprobs  # and the prompt's logprob entries before its own
        self.rid, self.prompt, self.model, self.backend, self.metrics = rid, prompt, model, backend, metrics
        self.tools = tools  # how the replies' text becomes tool calls (streaming.py)
        self.want_logprobs = want_logprobs
        self.key = affinity_key(prompt.token_ids, prompt.image_hashes, affinity_tokens)
        self.arrived = arrived or time.perf_counter()
        self.stats = [SampleStats() for _ in range(prompt.sampling.n)]
        self.media_gate = asyncio.Semaphore(MEDIA_PREFILLS_AT_ONCE if prompt.media else prompt.sampling.n)

    @property
    def n(self) -> int:
        return self.prompt.sampling.n

    def usage(self) -> dict:
        return usage(len(self.prompt.token_ids), sum(s.tokens for s in self.stats), self.stats[0].cached)

    def deltas(self) -> AsyncIterator[Delta]:
        """Deltas of all samples as they come; an error of any sample ends the whole request."""
        reqs = sample_requests(self.rid, self.prompt)
        return fan_in([self._sample(i, r) for i, r in enumerate(reqs)], self._failed, self._observe)

    def _failed(self, index: int, e: Exception) -> BaseException:
        self.stats[index].finish_reason = "error"
        # the colocated engine's InvalidRequest is a 400, as the proxy's own checks are
        return bad_request(str(e)) if isinstance(e, InvalidRequest) else e

    async def _sample(self, index: int, req: PrefillRequest) -> AsyncIterator[Delta]:
        sp, st = req.sampling, self.stats[index]
        detok = IncrementalDetokenizer(self.model.tokens, sp.stop or (), sp.skip_special_tokens)
        head, head_lp, prompt_lp, first = self.echo, (), None, True  # go out with the first delta
        async with (self._prefilling() as prefilled,
                    contextlib.aclosing(self.backend.generate(req, self.key)) as events):
            async for event in events:
                if first:
                    prefilled()
                    st.cached, first = event.num_cached_tokens, False
                    prompt_lp, head_lp = self._prompt_logprobs(sp, event)
                text, stopped, lp = "", False, None
                if event.token is not None:
                    self._count(st)
                    text, stopped = detok.add(event.token.token_id)
                    lp = (self._logprob(event.token),) if self.want_logprobs else None
                finish = "stop" if stopped else (event.finish_reason or None)
                if finish and not stopped:
                    text += detok.flush()
                text, head = head + text, ""
                if lp is not None:
                    lp, head_lp = head_lp + lp, ()
                if finish:
                    st.finish_reason = finish
                    yield Delta(index, text, lp, finish, prompt_lp, st.tokens)
                    return  # closing `events` cancels the decode stream (a stop string hit)
                if text or lp or prompt_lp:
                    yield Delta(index, text, lp, prompt_logprobs=prompt_lp, tokens=st.tokens)
                    prompt_lp = None

    @contextlib.asynccontextmanager
    async def _prefilling(self):
        """Holds a media_gate place until the sample's first event (its prefill done) or its end."""
        await self.media_gate.acquire()
        held = [True]

        def release() -> None:
            if held[0]:
                held[0] = False
                self.media_gate.release()
        try:
            yield release
        finally:
            release()

    def _prompt_logprobs(self, sp, event: TokenEvent) -> tuple[PromptLogprobList | None,
                                                                tuple[TokenLogprob, ...]]:
        """(vLLM's prompt_logprobs list, echo's prompt entries) from a sample's first event."""
        if sp.prompt_logprobs is None:
            return None, ()
        if event.prompt_logprobs is None:
            raise server_error("the backend answered without the prompt logprobs asked for")
        ids, tokens = self.prompt.token_ids, self.model.tokens
        entries = ranked(ids, event.prompt_logprobs, tokens)
        return entries, echo_entries(ids, entries, sp.logprobs, tokens) if self.echo_logprobs else ()

    @staticmethod
    def _count(st: SampleStats) -> None:
        now = time.perf_counter()
        if st.last_token_at is not None:
            st.gaps.append(now - st.last_token_at)
        st.first_token_at = st.first_token_at or now
        st.last_token_at = now
        st.tokens += 1

    def _logprob(self, tok: SampledToken) -> TokenLogprob:
        t = self.model.tokens
        top = tuple(TopLogprob(t.text(i), lp, tuple(t.bytes(i))) for i, lp in tok.top_logprobs)
        return TokenLogprob(t.text(tok.token_id), tok.logprob if tok.logprob is not None else 0.0,
                            tuple(t.bytes(tok.token_id)), top)

    def _observe(self) -> None:
        end = time.perf_counter()
        for i, st in enumerate(self.stats):
            ttft = st.first_token_at - self.arrived if st.first_token_at else None
            self.metrics.observe_request(st.finish_reason or "abort", len(self.prompt.token_ids) if i == 0 else 0,
                                         st.tokens, end - self.arrived, ttft, st.gaps)


"""Send the requests (Poisson arrivals or a concurrency bound) and time every streamed token."""
from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field

import httpx

from qwenvl_pd.loadgen.datasets import BenchRequest


@dataclass
class RequestResult:
    ok: bool = False
    ttft: float = 0.0  # seconds to the first chunk carrying text
    itl: list[float] = field(default_factory=list)  # gaps between text chunks
    e2el: float = 0.0
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str = ""
    start: float = 0.0  # since the benchmark began

    @property
    def tpot(self) -> float | None:
        return (self.e2el - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


def _text_of(chunk: dict) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    c = choices[0]
    return (c.get("delta") or {}).get("content") or c.get("text") or ""


async def _consume(resp: httpx.Response, res: RequestResult, t0: float) -> None:
    last, chunks = None, 0
    async for line in resp.aiter_lines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if "error" in chunk:
            raise RuntimeError(chunk["error"].get("message", "error event"))
        now = time.perf_counter()
        if _text_of(chunk):
            chunks += 1
            if last is None:
                res.ttft = now - t0
            else:
                res.itl.append(now - last)
            last = now
        if chunk.get("usage"):
            res.prompt_tokens = chunk["usage"]["prompt_tokens"]
            res.output_tokens = chunk["usage"]["completion_tokens"]
    res.output_tokens = res.output_tokens or chunks  # a server without include_usage


async def send(client: httpx.AsyncClient, base_url: str, req: BenchRequest, headers: dict,
               bench_start: float) -> RequestResult:
    res = RequestResult(start=time.perf_counter() - bench_start)
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", base_url + req.endpoint, json=req.body, headers=headers) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")
                raise RuntimeError(f"HTTP {resp.status_code}: {body[:200]}")
            await _consume(resp, res, t0)
        res.e2el, res.ok = time.perf_counter() - t0, True
    except Exception as e:  # a failed request is counted, not fatal
        res.error = f"{type(e).__name__}: {e}"
    return res


async def run(requests: list[BenchRequest], base_url: str, request_rate: float, max_concurrency: int | None,
              api_key: str | None = None, seed: int = 0, timeout_s: float = 600) -> tuple[list[RequestResult], float]:
    """(results in request order, wall seconds). request_rate inf: all at once."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=max_concurrency or 1000, max_keepalive_connections=100)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits, trust_env=False) as client:
        start = time.perf_counter()

        async def one(req: BenchRequest) -> RequestResult:
            if limit is None:
                return await send(client, base_url, req, headers, start)
            async with limit:
                return await send(client, base_url, req, headers, start)

        tasks = []
        for req in requests:
            tasks.append(asyncio.create_task(one(req)))
            if request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(request_rate))  # Poisson arrivals
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - start

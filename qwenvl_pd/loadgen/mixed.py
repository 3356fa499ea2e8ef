"""A prefill-heavy mix: a closed-loop stream of short chat requests decoding long outputs, and
long prompts (thousands of tokens with an image) arriving at a fixed interval while it runs.

What it shows: in one engine a long prompt's prefill chunks share steps with the short
requests' decode, so their inter-token latency jumps while it runs; with prefill and decode on
their own cores it should not. benchmarks/pd_vs_colocated.py --scenario prefill-heavy runs it.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

from qwenvl_pd.loadgen import datasets, report
from qwenvl_pd.loadgen.client import RequestResult, run

CHAT = "/v1/chat/completions"


@dataclass(frozen=True)
class MixedConfig:
    short_num: int = 32           # short chat requests in all, short_concurrency at a time
    short_concurrency: int = 4
    short_input_len: int = 64
    short_output_len: int = 128
    long_num: int = 8             # long prompts, one every long_interval_s after long_delay_s
    long_input_len: int = 4096    # text tokens; the image adds its own (256 at 448x448)
    long_output_len: int = 4
    long_image_size: tuple[int, int] = (448, 448)
    long_delay_s: float = 1.0     # the short stream is decoding by then
    long_interval_s: float = 1.5
    seed: int = 0


@dataclass
class MixedResult:
    short: list[RequestResult]
    long: list[RequestResult]
    duration: float


def requests(cfg: MixedConfig, model: str) -> tuple[list, list]:
    """(short, long) request lists: text-only chat, and an image plus long text."""
    short = datasets.build("random", cfg.short_num, cfg.short_input_len, cfg.short_output_len, 0.0, model,
                           seed=cfg.seed, endpoint=CHAT, ignore_eos=True)
    # a seed of their own: the lead word (request index) differs from the short ones' anyway
    long = datasets.build("random-mm", cfg.long_num, cfg.long_input_len, cfg.long_output_len, 0.0, model,
                          cfg.long_image_size, 1, cfg.seed + 1, CHAT, ignore_eos=True)
    return short, long


async def _long_stream(cfg: MixedConfig, reqs: list, base_url: str, api_key: str | None):
    await asyncio.sleep(cfg.long_delay_s)
    # rate 1/interval with run()'s Poisson gaps would bunch them; send at a fixed pace instead
    tasks = []
    for req in reqs:
        tasks.append(asyncio.create_task(run([req], base_url, float("inf"), None, api_key)))
        await asyncio.sleep(cfg.long_interval_s)
    return [r for results, _ in await asyncio.gather(*tasks) for r in results]


async def run_mixed(cfg: MixedConfig, base_url: str, model: str, api_key: str | None = None) -> MixedResult:
    short, long = requests(cfg, model)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    (short_res, _), long_res = await asyncio.gather(
        run(short, base_url, float("inf"), cfg.short_concurrency, api_key, cfg.seed),
        _long_stream(cfg, long, base_url, api_key))
    return MixedResult(short_res, long_res, loop.time() - t0)


def summarize(res: MixedResult) -> dict:
    """The numbers the scenario is judged by (milliseconds), and the failures."""
    s, lg = report.summarize(res.short, res.duration, {}), report.summarize(res.long, res.duration, {})
    return {"short_p50_itl_ms": s["median_itl_ms"], "short_p99_itl_ms": s["p99_itl_ms"],
            "short_p50_ttft_ms": s["median_ttft_ms"], "short_p99_ttft_ms": s["p99_ttft_ms"],
            "long_p50_ttft_ms": lg["median_ttft_ms"], "long_p99_ttft_ms": lg["p99_ttft_ms"],
            "short_completed": s["completed"], "long_completed": lg["completed"],
            "failed": s["failed"] + lg["failed"], "errors": s["errors"] + lg["errors"],
            "duration": res.duration}


def compare(summaries: dict[str, dict], keys: tuple[str, ...]) -> str:
    """One row per key: PD, colocated and PD / colocated."""
    pd, co = summaries["pd"], summaries["colocated"]
    lines = ["{:<22}{:>12}{:>12}{:>10}".format("(ms)", "PD", "colocated", "PD/colo")]
    for key in keys:
        ratio = pd[key] / co[key] if co[key] else float("nan")
        lines.append(f"{key:<22}{pd[key]:>12.2f}{co[key]:>12.2f}{ratio:>10.2f}")
    return "\n".join(lines)


MIXED_KEYS = ("short_p50_itl_ms", "short_p99_itl_ms", "short_p50_ttft_ms", "short_p99_ttft_ms",
              "long_p50_ttft_ms", "long_p99_ttft_ms")

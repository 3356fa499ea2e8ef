"""EPD against PD and colocated, one run: `qwenvl-pd serve --colocated`, `serve` and
`serve --num-encode 1` in turn (serve's default core pins: decode on the first half of the cores,
prefill and the proxy on the rest, with EPD the encoder on half of prefill's), each driven
through two workloads (benchmarks/epd_workloads.py, the same requests for every mode):

  image-heavy  2-4 images of 448-896 px per request, half of the image slots repeated across requests
  image-light  one request in ten with one image, the rest text only

Printed per workload: p50/p99 TTFT, output tok/s, the embedding cache hit rate (EPD: the
encoders' hits / lookups during the workload, from the proxy's /metrics), the encode rounds,
the rounds skipped (the prefill had every item of the request lately) and the fallbacks
(requests whose media went to prefill as bytes), and failed requests; then the issue's checks:
EPD's p99 TTFT below PD's on image-heavy, within 5% of PD's on image-light. --json keeps it all.

    python benchmarks/epd.py --quick                    # a few requests: does it all run
    python benchmarks/epd.py --requests 48 --concurrency 4
    python benchmarks/epd.py --model DIR --requests 64 --concurrency 8 --modes pd,epd,epd-store
"""
from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from epd_workloads import WORKLOADS, WorkloadConfig, build  # noqa: E402
from pd_vs_colocated import _serve  # noqa: E402

from qwenvl_pd.loadgen import report  # noqa: E402
from qwenvl_pd.loadgen.client import run  # noqa: E402
from qwenvl_pd.process import free_port  # noqa: E402

MODES = {"colocated": ["--colocated"], "pd": [], "epd": ["--num-encode", "1"],
         "epd-store": ["--num-encode", "1", "--embedding-store", "mooncake"]}
COUNTERS = ("embedding_cache_hits_total", "embedding_cache_misses_total", "encode_fallbacks_total",
            "encode_rounds_total", "encode_round_skips_total")
SETTLE_S = 2.5  # the proxy's load round (1 s) brings the encoders' counters into /metrics


def metrics(base: str) -> dict[str, float]:
    """Each of COUNTERS summed over its labels (0 where absent: no encoder)."""
    text = httpx.get(base + "/metrics", timeout=10, trust_env=False).text
    return {name: sum(float(v) for v in re.findall(rf"^qwenvl_pd:{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))
            for name in COUNTERS}


def one_workload(base: str, model: str, name: str, cfg: WorkloadConfig, concurrency: int) -> dict:
    requests = build(name, cfg, model)
    before = metrics(base)
    results, duration = asyncio.run(run(requests, base, float("inf"), concurrency, seed=cfg.seed))
    time.sleep(SETTLE_S)
    delta = {k: v - before[k] for k, v in metrics(base).items()}
    s = report.summarize(results, duration, {})
    lookups = delta["embedding_cache_hits_total"] + delta["embedding_cache_misses_total"]
    s["hit_rate"] = delta["embedding_cache_hits_total"] / lookups if lookups else None
    s["fallbacks"] = delta["encode_fallbacks_total"]
    s["encode_rounds"] = delta["encode_rounds_total"]
    s["skips"] = delta["encode_round_skips_total"]  # the prefill had every item lately: no encoder asked
    return s


def one_mode(mode: str, args, cfg: WorkloadConfig, log) -> dict[str, dict]:
    port = free_port()
    proc = _serve(args.model, False, port, log, MODES[mode] + args.serve_arg)
    base = f"http://127.0.0.1:{port}"
    try:
        model = httpx.get(base + "/v1/models", timeout=30, trust_env=False).json()["data"][0]["id"]
        warm = WorkloadConfig(requests=2, input_len=8, output_len=4, seed=cfg.seed + 99)
        asyncio.run(run(build("image-heavy", warm, model), base, float("inf"), 2))  # first-call costs
        out = {}
        for name in args.workloads:
            out[name] = one_workload(base, model, name, cfg, args.concurrency)
            print(f"{mode} {name}: {_row(mode, out[name])}", flush=True)
        return out
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def _row(mode: str, s: dict) -> str:
    hit = "-" if s["hit_rate"] is None else f"{s['hit_rate']:.2f}"
    return (f"| {mode} | {s['median_ttft_ms']:.0f} | {s['p99_ttft_ms']:.0f} | {s['output_throughput']:.1f} | "
            f"{hit} | {s['encode_rounds']:.0f} / {s['skips']:.0f} / {s['fallbacks']:.0f} | {s['completed']} | "
            f"{s['failed']} |")


def print_tables(results: dict[str, dict[str, dict]], workloads: list[str]) -> None:
    for name in workloads:
        print(f"\n### {name}\n| mode | p50 TTFT ms | p99 TTFT ms | output tok/s | embedding hit rate | "
              "encode rounds / skipped / fallbacks | completed | failed |\n|---|---|---|---|---|---|---|---|")
        for mode, by_workload in results.items():
            print(_row(mode, by_workload[name]))
        for s in (s for r in results.values() for s in [r[name]] if s["errors"]):
            print(f"errors: {s['errors']}")
    if {"pd", "epd"} <= results.keys():
        print()
        for name, bound, want in (("image-heavy", 1.0, "< PD's"), ("image-light", 1.05, "<= 1.05 x PD's")):
            if name in workloads:
                ratio = results["epd"][name]["p99_ttft_ms"] / max(results["pd"][name]["p99_ttft_ms"], 1e-9)
                ok = ratio < bound if bound == 1.0 else ratio <= bound
                print(f"{name}: EPD p99 TTFT / PD p99 TTFT = {ratio:.3f} (want {want}): {'yes' if ok else 'NO'}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint directory (default: serve's tiny random-weight model)")
    p.add_argument("--modes", default="colocated,pd,epd", help=f"comma-separated, of {', '.join(MODES)}")
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--requests", type=int, default=WorkloadConfig.requests, help="per workload")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight at once")
    p.add_argument("--output-len", type=int, default=WorkloadConfig.output_len)
    p.add_argument("--input-len", type=int, default=WorkloadConfig.input_len, help="text words per request")
    p.add_argument("--quick", action="store_true", help="8 requests, 2 at a time, 8 tokens out")
    p.add_argument("--serve-arg", action="append", default=[], metavar="ARG", help="pass ARG on to every serve")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log", default="epd_bench.log", help="the servers' output")
    p.add_argument("--json", help="also write every mode's summaries here")
    args = p.parse_args()
    args.modes, args.workloads = args.modes.split(","), args.workloads.split(",")
    if unknown := set(args.modes) - MODES.keys() | set(args.workloads) - set(WORKLOADS):
        p.error(f"unknown mode or workload: {', '.join(sorted(unknown))}")
    if args.quick:
        args.requests, args.concurrency, args.output_len = 8, 2, 8
    cfg = WorkloadConfig(requests=args.requests, input_len=args.input_len, output_len=args.output_len,
                         seed=args.seed)
    with open(args.log, "w") as log:
        results = {mode: one_mode(mode, args, cfg, log) for mode in args.modes}
    print_tables(results, args.workloads)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    return 0 if all(s["failed"] == 0 for r in results.values() for s in r.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

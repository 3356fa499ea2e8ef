"""PD (`qwenvl-pd serve`) against colocated (`qwenvl-pd serve --colocated`) at the same load:
start one, run the benchmark, stop it, start the other, run it again, --rounds times (3), print
each key's median over the rounds and the ratios (PD / colocated). Same proxy, tokenizer and protocol path in both: only where the
tokens are computed differs.

Both scenarios run with serve's default pins (cpus.split_roles; --no-pin, passed on to serve,
leaves them all on all cores): PD runs decode alone on the first half of the cores, prefill and
the proxy on the rest (on 2 cores: 0 | 1); colocated runs its one process on all of them (the
same cores in all; the load generator, this process, is not pinned). Unpinned, a prefill that overlaps a decode oversubscribes the cores
with both nodes' torch threads, which is where unpinned PD loses TPOT at low load.

--scenario default: low load (random-mm, 0.5 req/s); median TTFT and TPOT ratios.
--scenario prefill-heavy: what PD is for. Short chat requests (64 in / 128 out, 4 at a time) decode while
long prompts (4096 text tokens + a 448x448 image, 4352 tokens) arrive every 1.5 s; prints
p50/p99 ITL and TTFT of the short stream, TTFT of the long ones. The proxy sits with prefill,
not decode: it handles every token (detokenise, SSE) and parses each long body, and on the
decode's core that work and the decode steps delay each other (p99 ITL 53-73 ms there against
38-64 ms beside prefill, this 2-core machine, shared).

    .venv/bin/python benchmarks/pd_vs_colocated.py                       # tiny model, low load
    .venv/bin/python benchmarks/pd_vs_colocated.py --scenario prefill-heavy
    .venv/bin/python benchmarks/pd_vs_colocated.py --model DIR --num-prompts 50 --request-rate 0.5
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time

import httpx

from qwenvl_pd.loadgen import mixed
from qwenvl_pd.loadgen.serve import bench, parser as bench_parser
from qwenvl_pd.serve import free_port

DEFAULT_LOAD = ["--dataset-name", "random-mm", "--num-prompts", "20", "--request-rate", "0.5",
                "--random-input-len", "64", "--random-output-len", "32", "--random-mm-image-size",
                "224x224", "--ignore-eos"]
DEFAULT_KEYS = ("mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms")


def _serve(model: str | None, colocated: bool, port: int, log, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "qwenvl_pd.cli", "serve", "--port", str(port), *extra]
    cmd += (["--model", model] if model else []) + (["--colocated"] if colocated else [])
    log.write(f"\n##### {' '.join(cmd)}\n")
    log.flush()
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, env={**os.environ, "GLOG_minloglevel": "2"})
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"serve exited with {proc.returncode}; see {log.name}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError("serve did not become healthy")


def _each_mode(args, extra: list[str], run_one) -> dict[str, dict]:
    """Rounds of PD then colocated; each key's median over the rounds. On a shared machine
    one pair is mostly the load's drift between its two runs; alternating rounds even it out."""
    rounds: dict[str, list[dict]] = {"pd": [], "colocated": []}
    with open(args.log, "w") as log:
        for r in range(args.rounds):
            for mode in rounds:
                rounds[mode].append(_one_run(args, mode, f"{mode} (round {r + 1})", log, extra, run_one))
    return {mode: _medians(runs) for mode, runs in rounds.items()}


def _one_run(args, mode: str, label: str, log, extra: list[str], run_one) -> dict:
    port = free_port()
    proc = _serve(args.model, mode == "colocated", port, log, extra)
    try:
        print(f"\n##### {label}", flush=True)
        return run_one(mode, port)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def _medians(runs: list[dict]) -> dict:
    numbers = [k for k, v in runs[0].items() if isinstance(v, (int, float))]
    return {k: (sum if k == "failed" else statistics.median)([r[k] for r in runs]) for k in numbers}


def _pins(args) -> list[str]:
    return ["--no-pin"] if args.no_pin else []  # serve pins by default


def _default(args, rest: list[str]) -> dict[str, dict]:
    def one(mode: str, port: int) -> dict:
        return bench(bench_parser().parse_args(DEFAULT_LOAD + rest + ["--port", str(port), "--label", mode]))
    summaries = _each_mode(args, _pins(args) + args.serve_arg, one)
    print("\n" + mixed.compare(summaries, DEFAULT_KEYS))
    return summaries


def _prefill_heavy(args, rest: list[str]) -> dict[str, dict]:
    if rest:
        raise SystemExit(f"--scenario prefill-heavy takes no bench flags: {rest}")
    cfg = mixed.MixedConfig(short_num=args.short_num, long_num=args.long_num,
                            long_input_len=args.long_input_len, long_interval_s=args.long_interval)

    def one(mode: str, port: int) -> dict:
        base = f"http://127.0.0.1:{port}"
        model = httpx.get(base + "/v1/models", timeout=30).json()["data"][0]["id"]
        s = mixed.summarize(asyncio.run(mixed.run_mixed(cfg, base, model)))
        print(json.dumps({k: v for k, v in s.items() if k not in mixed.MIXED_KEYS}), flush=True)
        return s
    summaries = _each_mode(args, _pins(args) + args.serve_arg, one)
    print("\n" + mixed.compare(summaries, mixed.MIXED_KEYS))
    return summaries


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint directory (default: serve's tiny random-weight model)")
    p.add_argument("--scenario", default="default", choices=["default", "prefill-heavy"])
    p.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                   help="pass ARG on to both serves, e.g. --serve-arg=--max-num-batched-tokens=512")
    p.add_argument("--short-num", type=int, default=mixed.MixedConfig.short_num, help="prefill-heavy")
    p.add_argument("--long-num", type=int, default=mixed.MixedConfig.long_num, help="prefill-heavy")
    p.add_argument("--long-input-len", type=int, default=mixed.MixedConfig.long_input_len, help="prefill-heavy")
    p.add_argument("--long-interval", type=float, default=mixed.MixedConfig.long_interval_s,
                   help="prefill-heavy: seconds between long prompts")
    p.add_argument("--no-pin", action="store_true", help="leave every role on every core")
    p.add_argument("--rounds", type=int, default=3, help="PD/colocated pairs; medians over them")
    p.add_argument("--log", default="pd_vs_colocated.log")
    args, rest = p.parse_known_args()
    summaries = (_prefill_heavy if args.scenario == "prefill-heavy" else _default)(args, rest)
    return 0 if all(s.get("failed", 0) == 0 for s in summaries.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

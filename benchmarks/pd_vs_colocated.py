"""PD (`qwenvl-pd serve`) against colocated (`qwenvl-pd serve --colocated`) at the same load:
start one, run the benchmark, stop it, start the other, run it again, print both tables and
the TTFT and TPOT ratios (PD / colocated). Same proxy, tokenizer and protocol path in both:
only where the tokens are computed differs.

    .venv/bin/python benchmarks/pd_vs_colocated.py                       # tiny model, low load
    .venv/bin/python benchmarks/pd_vs_colocated.py --model DIR --num-prompts 50 --request-rate 0.5
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

import httpx

from qwenvl_pd.bench.serve import bench, parser as bench_parser
from qwenvl_pd.serve import free_port


def _serve(model: str | None, colocated: bool, port: int, log) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "qwenvl_pd.cli", "serve", "--port", str(port)]
    cmd += (["--model", model] if model else []) + (["--colocated"] if colocated else [])
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint directory (default: serve's tiny random-weight model)")
    p.add_argument("--log", default="pd_vs_colocated.log")
    args, rest = p.parse_known_args()
    defaults = ["--dataset-name", "random-mm", "--num-prompts", "20", "--request-rate", "0.5",
                "--random-input-len", "64", "--random-output-len", "32", "--random-mm-image-size",
                "224x224", "--ignore-eos"]
    summaries = {}
    with open(args.log, "w") as log:
        for mode in ("pd", "colocated"):
            port = free_port()
            proc = _serve(args.model, mode == "colocated", port, log)
            try:
                bargs = bench_parser().parse_args(defaults + rest + ["--port", str(port), "--label", mode])
                print(f"\n##### {mode}")
                summaries[mode] = bench(bargs)
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)
    pd, co = summaries["pd"], summaries["colocated"]
    print("\n{:<22}{:>12}{:>12}{:>10}".format("(ms)", "PD", "colocated", "PD/colo"))
    for key in ("mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms"):
        ratio = pd[key] / co[key] if co[key] else float("nan")
        print(f"{key:<22}{pd[key]:>12.2f}{co[key]:>12.2f}{ratio:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

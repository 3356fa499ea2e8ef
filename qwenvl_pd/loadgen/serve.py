"""`qwenvl-pd bench` / `python benchmarks/serve.py`: vLLM's `bench serve`, for any OpenAI endpoint.

    qwenvl-pd bench --base-url http://127.0.0.1:8000 --dataset-name random --random-input 200 \\
        --random-output 64 --num-prompts 200 --request-rate 1 --save-result --result-dir ./

Flags keep vLLM's names (prefixes work too: --random-input, --num-prompt), so the guides'
commands run as written against the proxy; prints vLLM's table, writes JSON and a PNG of CDFs.
"""
from __future__ import annotations

import argparse
import asyncio
import time
from datetime import datetime
from pathlib import Path

import httpx

from qwenvl_pd.loadgen import datasets, report
from qwenvl_pd.loadgen.client import run


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwenvl-pd bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", help="e.g. http://127.0.0.1:8000 (default: http://HOST:PORT)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--endpoint", help="/v1/completions (random) or /v1/chat/completions (random-mm)")
    p.add_argument("--backend", default="openai", help="accepted for vLLM compatibility; always OpenAI")
    p.add_argument("--model", help="model name to send (default: the server's first /v1/models entry)")
    p.add_argument("--api-key")
    p.add_argument("--dataset-name", default="random", choices=["random", "random-mm"])
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--random-input-len", type=int, default=200)
    p.add_argument("--random-output-len", type=int, default=64)
    p.add_argument("--random-range-ratio", type=float, default=0.0)
    p.add_argument("--random-mm-image-size", default="448x448", help="WIDTHxHEIGHT of each random image")
    p.add_argument("--random-mm-num-images", type=int, default=1)
    p.add_argument("--ignore-eos", action="store_true", help="generate exactly the output length")
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (Poisson); inf: all at once")
    p.add_argument("--max-concurrency", type=int)
    p.add_argument("--goodput", nargs="+", metavar="KEY:MS", help="SLOs, e.g. ttft:500 tpot:50")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-result", action="store_true")
    p.add_argument("--result-dir", default=".")
    p.add_argument("--result-filename")
    p.add_argument("--label", default="", help="a name for this run in the JSON and the plot")
    return p


def _model_name(base_url: str, api_key: str | None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    resp = httpx.get(base_url + "/v1/models", headers=headers, timeout=30, trust_env=False)
    resp.raise_for_status()
    return resp.json()["data"][0]["id"]


def bench(args: argparse.Namespace) -> dict:
    base_url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    model = args.model or _model_name(base_url, args.api_key)
    size = tuple(int(x) for x in args.random_mm_image_size.lower().split("x"))
    reqs = datasets.build(args.dataset_name, args.num_prompts, args.random_input_len, args.random_output_len,
                          args.random_range_ratio, model, size, args.random_mm_num_images, args.seed,
                          args.endpoint, args.ignore_eos)
    slos = report.parse_goodput(args.goodput)
    print(f"{len(reqs)} {args.dataset_name} requests -> {base_url}{reqs[0].endpoint} (model {model}), "
          f"rate {args.request_rate}/s, max concurrency {args.max_concurrency or 'none'}", flush=True)
    results, duration = asyncio.run(run(reqs, base_url, args.request_rate, args.max_concurrency,
                                        args.api_key, args.seed))
    summary = report.summarize(results, duration, slos)
    print(report.table(summary, slos))
    if args.save_result:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        name = args.result_filename or f"{args.label or 'qwenvl-pd'}-{args.dataset_name}-{stamp}.json"
        path = Path(args.result_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"date": stamp, "label": args.label, "base_url": base_url, "model": model,
                "dataset": args.dataset_name, "num_prompts": args.num_prompts,
                "request_rate": str(args.request_rate), "max_concurrency": args.max_concurrency,
                "goodput_slos_s": slos, "time": time.time()}
        report.save_json(path, summary, results, meta)
        report.plot(path.with_suffix(".png"), results, f"{args.label or model}: {args.dataset_name}, "
                    f"{args.num_prompts} requests, rate {args.request_rate}/s")
        print(f"wrote {path} and {path.with_suffix('.png')}")
    return summary


def main(argv: list[str] | None = None) -> int:
    summary = bench(parser().parse_args(argv))
    return 0 if summary["completed"] else 1

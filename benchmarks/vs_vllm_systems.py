"""The five systems benchmarks/vs_vllm.py compares, each run as its own process: offline
`LLM.generate` (benchmarks/vs_vllm_offline.py in vLLM's venv or ours) and `vllm bench serve`
against `vllm serve`, `qwenvl-pd serve` and `qwenvl-pd serve --colocated`."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import vllm_cpu_env
from qwenvl_pd.process import free_port

HERE, ROOT = Path(__file__).resolve().parent, Path(__file__).resolve().parents[1]
NAME = "bench"  # every server's --served-model-name, and vllm bench serve's


def offline(system: str, model: Path, workloads: list, args, log: Path) -> dict[str, dict]:
    """One engine started once, every workload in turn -> name -> result."""
    python = args.vllm_python if system == "vllm-offline" else sys.executable
    engine = "vllm" if system == "vllm-offline" else "ours"
    spec = {w.name: {**dataclasses.asdict(w), "sizes": list(w.sizes)} for w in workloads}
    cmd = [str(python), str(HERE / "vs_vllm_offline.py"), "--engine", engine, "--model", str(model),
           "--workloads", json.dumps(spec), "--max-model-len", str(args.max_model_len),
           "--kv-cache-gib", str(args.kv_cache_gib)]
    with open(log, "w") as f:  # vLLM logs to stdout: all of it to the log, RESULT lines read back
        code = subprocess.run(cmd, env=_env(args), stdout=f, stderr=subprocess.STDOUT,
                              timeout=args.timeout).returncode
    results = {}
    for line in log.read_text().splitlines():
        if line.startswith("RESULT "):
            name, _, body = line.removeprefix("RESULT ").partition(" ")
            results[name] = json.loads(body)
    if code:
        print(f"vs_vllm: {system} exited with {code}; see {log}", flush=True)
    return {w.name: results.get(w.name, {"error": f"no result (exit {code}); see {log}"}) for w in workloads}


def _env(args) -> dict[str, str]:
    env = {**vllm_cpu_env.env(), "VLLM_CPU_KVCACHE_SPACE": str(max(1, round(args.kv_cache_gib))),
           "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    if args.vllm_cores == "all":  # vLLM's default keeps a core for its front end (1 of 2 here)
        env.update(VLLM_CPU_OMP_THREADS_BIND=vllm_cpu_env.allowed_cores(), VLLM_CPU_NUM_OF_RESERVED_CPU="0")
    return env


def _server_cmd(system: str, model: Path, port: int, args) -> list[str]:
    common = ["--port", str(port), "--served-model-name", NAME, "--max-model-len", str(args.max_model_len)]
    if system == "vllm-serve":
        limit = json.dumps({"image": max(w.images_hi for w in args.workloads), "video": 0})
        return [str(args.vllm_python.parent / "vllm"), "serve", str(model), *common,
                "--limit-mm-per-prompt", limit, *args.vllm_arg]
    return [sys.executable, "-m", "qwenvl_pd.cli", "serve", "--model", str(model), *common,
            "--kv-cache-gib", str(args.kv_cache_gib), *(["--colocated"] if system == "colocated" else []),
            *args.serve_arg]


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def start(system: str, model: Path, args, log: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen(_server_cmd(system, model, port, args), env=_env(args), stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    t0 = time.monotonic()
    while not _ready(port):
        if proc.poll() is not None or time.monotonic() - t0 > args.timeout:
            stop(proc)
            raise RuntimeError(f"{system} did not start (exit {proc.returncode}); see {log}")
        time.sleep(1)
    print(f"vs_vllm: {system} ready in {time.monotonic() - t0:.0f} s", flush=True)
    return proc, port


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and what it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _dataset_args(w: Workload) -> list[str]:
    mid = (w.input_lo + w.input_hi) // 2
    ratio = (w.input_hi - w.input_lo) / (w.input_hi + w.input_lo)
    text = ["--random-input-len", str(mid), "--random-range-ratio", f"{ratio:.4f}",
            "--random-output-len", str(w.output)]
    if not w.images_hi:
        return ["--backend", "openai", "--endpoint", "/v1/completions", "--dataset-name", "random", *text]
    base = (w.images_lo + w.images_hi) // 2  # vLLM draws from [floor(base(1-r)), ceil(base(1+r))]
    buckets = "{" + ", ".join(f"({s}, {s}, 1): {1 / len(w.sizes):.4f}" for s in w.sizes) + "}"
    return ["--backend", "openai-chat", "--endpoint", "/v1/chat/completions", "--dataset-name", "random-mm",
            *text, "--random-mm-base-items-per-request", str(base),
            "--random-mm-num-mm-items-range-ratio", f"{(w.images_hi - base) / base:.4f}",
            "--random-mm-limit-mm-per-prompt", json.dumps({"image": w.images_hi, "video": 0}),
            "--random-mm-bucket-config", buckets]


def online(port: int, model: Path, w: Workload, args, log: Path) -> dict:
    result = log.with_suffix(".json")
    cmd = [str(args.vllm_python.parent / "vllm"), "bench", "serve", "--base-url", f"http://127.0.0.1:{port}",
           "--model", str(model), "--served-model-name", NAME, *_dataset_args(w),
           "--num-prompts", str(w.prompts), "--max-concurrency", str(w.concurrency), "--ignore-eos",
           "--seed", "0", "--disable-tqdm", "--save-result", "--result-dir", str(result.parent),
           "--result-filename", result.name]
    with open(log, "w") as f:
        code = subprocess.run(cmd, env=vllm_cpu_env.env(), stdout=f, stderr=subprocess.STDOUT,
                              timeout=args.timeout).returncode
    if code or not result.exists():
        raise RuntimeError(f"vllm bench serve failed (exit {code}); see {log}")
    r = json.loads(result.read_text())
    if r.get("completed", 0) < w.prompts:
        raise RuntimeError(f"{r.get('completed')} of {w.prompts} requests completed; see {log}")
    return r

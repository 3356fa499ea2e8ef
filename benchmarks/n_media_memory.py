"""Peak memory of the proxy and the prefill for one request with a large image, n=1 against n=N
samples (issue 26: media must not travel once per sample). Each case runs on a fresh
`qwenvl-pd serve`, so VmHWM (the kernel's peak RSS) measures that request alone.

    .venv/bin/python benchmarks/n_media_memory.py --model ~/.cache/qwenvl-pd/tiny-qwen2_5_vl --n 32
"""
import argparse
import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
from PIL import Image

START_S = 180


def _kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [(int(line.split()[0]), line) for line in out.splitlines() if line.strip()]


def _role_pid(serve_pid: int, role: str) -> int:
    return next(pid for pid, args in _children(serve_pid) if f"cli {role}" in args or f"qwenvl-pd {role}" in args)


def _wait_ready(port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"serve did not become healthy (exit {proc.poll()})")


def _image_url(megabytes: float) -> str:
    side = int((megabytes * 1e6 / 3) ** 0.5)  # random noise: PNG barely compresses it
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _ask(port: int, url: str, n: int) -> int:
    body = {"model": "m", "n": n, "max_tokens": 4, "temperature": 1.0,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": "describe"}]}]}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return len(json.loads(r.read())["choices"])


def one_case(args, n: int, url: str) -> dict:
    port = 18000 + n
    proc = subprocess.Popen([sys.executable, "-m", "qwenvl_pd.cli", "serve", "--model", args.model, "--port",
                             str(port), "--served-model-name", "m"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_ready(port, proc)
        pids = {role: _role_pid(proc.pid, role) for role in ("proxy", "prefill")}
        before = {role: _kib(pid, "VmHWM") for role, pid in pids.items()}
        choices = _ask(port, url, n)
        after = {role: _kib(pid, "VmHWM") for role, pid in pids.items()}
        return {"n": n, "choices": choices, **{role: (after[role] - before[role]) / 1024 for role in pids}}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.path.expanduser("~/.cache/qwenvl-pd/tiny-qwen2_5_vl"))
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--image-mb", type=float, default=8.0)
    args = ap.parse_args()
    url = _image_url(args.image_mb)
    rows = [one_case(args, n, url) for n in (1, args.n)]
    print(f"image: {len(url) * 3 / 4 / 1e6:.1f} MB PNG")
    print("| n | choices | proxy peak growth (MiB) | prefill peak growth (MiB) |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['n']} | {r['choices']} | {r['proxy']:.0f} | {r['prefill']:.0f} |")
    for role in ("proxy", "prefill"):
        print(f"{role}: n={args.n} / n=1 = {rows[1][role] / max(rows[0][role], 1e-9):.2f}x")


if __name__ == "__main__":
    main()

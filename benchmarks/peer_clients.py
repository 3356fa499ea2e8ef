"""Client tools nobody here wrote, against `qwenvl-pd serve`, as a new user would run them: aiperf,
guidellm, lm-eval, evalscope, AISBench and vLLM's `vllm bench serve`, each in a venv of its own
(~/.cache/qwenvl-pd/peer-venvs/TOOL, installed once), each in text and image mode with modest
request counts and the tool's own defaults for what it sends. Prints tool x mode x (requests ok,
failed, the tool's headline figures) and writes the same as JSON. Not part of CI (installs are
large and slow; the tools' own details are in benchmarks/peer_tools.py).

    .venv/bin/python benchmarks/peer_clients.py [--model DIR] [--tools aiperf,vllm] [--requests 8]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from peer_tools import MODES, TOOLS, Ctx, ais_configs, lm_eval_tasks  # noqa: E402

VENVS = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qwenvl-pd" / "peer-venvs"
# lm-eval's local json tasks must not look for the hub (out of reach); aiperf's tokenizer loading
# fails in offline mode, so the others run as they are
OFFLINE = {"lm-eval": {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}}
LOOPBACK = {"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


def install(name: str) -> Path:
    """The tool's own venv, installed once (a .installed marker), its quirks applied."""
    venv, tool = VENVS / name, TOOLS[name]
    if not (venv / ".installed").exists():
        VENVS.mkdir(parents=True, exist_ok=True)
        print(f"installing {name} into {venv} (once; slow)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        with open(VENVS / f"{name}.log", "a") as log:
            subprocess.run(["nice", "-n", "10", str(venv / "bin/pip"), "install", *tool.pip], check=True,
                           stdout=log, stderr=subprocess.STDOUT)
        (venv / ".installed").touch()
    tool.quirks(venv)
    return venv


def serve(model: str, port: int, work: Path, log) -> subprocess.Popen:
    # AISBench's image set names local files: the proxy serves media from under the work folder
    cmd = [sys.executable, "-m", "qwenvl_pd.cli", "serve", model, "--port", str(port), "--max-model-len",
           "4096", f"--proxy-arg=--allowed-local-media-path={work}"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(1)
    proc.terminate()
    raise RuntimeError(f"qwenvl-pd serve did not become healthy (see {log.name})")


def server_samples(url: str) -> dict[str, float]:
    """The proxy's finished samples by reason: a check on what each tool reports."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("qwenvl_pd:request_success_total{"):
            reason = line.split('finished_reason="')[1].split('"')[0]
            out[reason] = float(line.rsplit(" ", 1)[1])
    return out


def run_one(name: str, mode: str, ctx: Ctx) -> dict:
    tool, log = TOOLS[name], ctx.work / "tool.log"
    ctx.work.mkdir(parents=True, exist_ok=True)
    before, start = server_samples(ctx.url), time.monotonic()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(tool.command(mode, ctx), cwd=ctx.work, stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, **LOOPBACK, **OFFLINE.get(name, {})}, timeout=900).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    after = server_samples(ctx.url)
    row = {"tool": name, "mode": mode, "rc": rc, "seconds": round(time.monotonic() - start, 1),
           "server": {k: int(after.get(k, 0) - before.get(k, 0)) for k in after if after[k] != before.get(k, 0)}}
    try:
        row["ok"], row["failed"], row["headline"] = tool.result(mode, ctx)
    except (OSError, KeyError, ValueError, IndexError, StopIteration) as e:
        why = f"no report ({type(e).__name__}: {e})"
        if "TINFER-PARAM-005" in log.read_text(errors="replace") or any(
                "TINFER-PARAM-005" in p.read_text(errors="replace") for p in ctx.work.glob("*/logs/**/*.out")):
            why = "AISBench refused to start: its own guard, host memory over 80% used; rerun when quieter"
        row["ok"], row["failed"], row["headline"] = 0, "?", f"{why}; see {log}"
    return row


def images(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for colour in ("red", "green", "blue", "white", "black", "yellow"):
        out.append(folder / f"{colour}.png")
        Image.new("RGB", (64, 48), colour).save(out[-1])
    return out


def table(rows: list[dict]) -> str:
    head = ("tool", "mode", "ok", "failed", "server samples", "headline")
    lines = [head] + [(r["tool"], r["mode"], str(r["ok"]), str(r["failed"]),
                       ", ".join(f"{k} {v}" for k, v in sorted(r["server"].items())), r["headline"])
                      for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join(" | ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint directory (default: the tiny random-weight one)")
    p.add_argument("--tools", default=",".join(TOOLS), help="comma-separated, of " + ", ".join(TOOLS))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--requests", type=int, default=8, help="requests per tool and mode")
    p.add_argument("--port", type=int, default=8321)
    p.add_argument("--work", help="folder for reports and inputs (default: a temporary one)")
    args = p.parse_args()
    from qwenvl_pd.serve import tiny_model_dir
    model = args.model or str(tiny_model_dir())
    work = Path(args.work or tempfile.mkdtemp(prefix="qwenvl-pd-peers-")).resolve()
    names = [n for n in args.tools.split(",") if n]
    venvs = {n: install(n) for n in names}
    pictures = images(work / "data/images")
    url, rows = f"http://127.0.0.1:{args.port}", []
    with open(work / "serve.log", "w") as log:
        proc = serve(model, args.port, work, log)
        try:
            for name in names:
                for mode in args.modes.split(","):
                    ctx = Ctx(model, url, work / name / mode, work / "data", args.requests, venvs[name])
                    if name == "lm-eval":
                        lm_eval_tasks(ctx.data / "lm_eval", pictures)
                    if name == "ais-bench":
                        ais_configs(ctx.data / "ais", ctx, args.port, pictures)
                    rows.append(run_one(name, mode, ctx))
                    print(json.dumps(rows[-1]), flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    (work / "peer_clients.json").write_text(json.dumps(rows, indent=1))
    print(table(rows))
    print(f"reports and logs under {work}")
    return 0 if all(r["rc"] == 0 and r["failed"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

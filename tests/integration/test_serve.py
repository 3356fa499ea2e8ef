"""`qwenvl-pd serve` as a user runs it: the whole system, the openai client, then SIGTERM."""
import base64
import os
import signal
import subprocess
import sys
import tempfile
import time

import httpx
import openai
import pytest

from nodes import free_port, png_bytes

from PIL import Image

from qwenvl_pd.cpus import format_cpus, split_roles


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _cpus_allowed(pid: int) -> str:
    with open(f"/proc/{pid}/status") as f:
        return next(line for line in f if line.startswith("Cpus_allowed_list:")).split()[1]


def _role(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline") as f:
        argv = f.read().split("\0")
    return argv[argv.index("qwenvl_pd.cli") + 1]


def _pinning(tp: int) -> tuple[list[str], dict[str, str]]:
    """TP 1: serve's default pins, no flags (decode on the first half of the cores, prefill and
    proxy on the rest); TP 2: given by flags. -> serve's flags, and each role's expected list."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return [], {}
    if tp == 1:
        prefill, decode, proxy = split_roles(tuple(cores))
        return [], {"prefill": format_cpus(prefill), "decode": format_cpus(decode), "proxy": format_cpus(proxy)}
    a, b = str(cores[0]), str(cores[-1])
    return (["--cpus-prefill", b, "--cpus-decode", a, "--cpus-proxy", b],
            {"prefill": b, "decode": a, "proxy": b})


def _check_pinned(children: list[int], expected: dict[str, str]) -> None:
    """Each role runs on its --cpus, and so do its TP ranks (children inherit the affinity)."""
    for c in children:
        want = expected[_role(c)]
        assert _cpus_allowed(c) == want, _role(c)
        assert all(_cpus_allowed(g) == want for g in _children(c)), _role(c)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("tp", [1, 2])
def test_serve_answers_the_openai_client_and_stops_everything(request, tmp_path, tp):
    port = free_port()
    # TP 1 builds the tiny default model into an empty cache; TP 2 finds it built
    cache = tmp_path if tp == 1 else request.getfixturevalue("serve_cache")
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    log = tempfile.TemporaryFile("w+")
    pin_args, pinned = _pinning(tp)
    proc = subprocess.Popen([sys.executable, "-m", "qwenvl_pd.cli", "serve", "--port", str(port),
                             "--tensor-parallel-size", str(tp), *pin_args],
                            env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        assert proc.poll() is None, "serve exited early"
        image = png_bytes(Image.new("RGB", (112, 84), (10, 200, 30)))
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", timeout=60,
                               max_retries=0)
        model = client.models.list().data[0].id
        reply = client.chat.completions.create(model=model, max_tokens=5, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(image).decode()}},
            {"type": "text", "text": "What colour?"}]}])
        assert reply.usage.completion_tokens <= 5
        assert reply.usage.prompt_tokens > 12  # 112x84 at patch 14, merge 2: 12 image tokens + text
        children = _children(proc.pid)
        assert len(children) >= 3  # prefill, decode, proxy
        if pinned:
            _check_pinned(children, pinned)
        ranks = [g for c in children for g in _children(c)]  # each node's rank 1 (and its tracker)
        assert len(ranks) >= 2 * (tp - 1)
        children += ranks
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    deadline = time.monotonic() + 15
    while any(_alive(c) for c in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(c) for c in children)
    log.seek(0)
    assert "RANDOM" in log.read().upper()  # the loud random-weights banner

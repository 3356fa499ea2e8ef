"""The users' guides' own lines (shared/seeds 000-002), `vllm serve` replaced by `qwenvl-pd serve`
and the model by a tiny checkpoint: seed 000's and 001's serve lines start and answer the guides'
curl (its image a local PNG, and max_tokens added so a random model stops soon); seed 002's
multi-node data-parallel lines are refused with the commands that deploy the same here."""
import base64
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

import httpx
import pytest
from PIL import Image

from qwenvl_pd.model.tiny import make_tiny

from nodes import free_port, png_bytes, stop

# verbatim from the guides (000: Qwen3-VL-8B single card; 001: Qwen2.5-VL-32B W8A8, TP 2)
SEED_000 = """vllm serve Qwen/Qwen3-VL-8B-Instruct \\
--dtype bfloat16 \\
--max_model_len 16384 \\
--max-num-batched-tokens 16384"""
SEED_001 = """vllm serve /data/Qwen2.5-VL-32B-Instruct-w8a8 \\
    --host 0.0.0.0 \\
    --port 8888 \\
    --served-model-name qwen25_vl \\
    --quantization ascend \\
    --async-scheduling \\
    --tensor-parallel-size 2 \\
    --max-model-len 30000 \\
    --max-num-batched-tokens 50000 \\
    --max-num-seqs 30 \\
    --no-enable-prefix-caching \\
    --trust-remote-code \\
    --additional-config '{"enable_weight_nz_layout":true}'"""
SEED_002 = ["""vllm serve Qwen/Qwen3-VL-235B-A22B-Instruct \\
--host 0.0.0.0 \\
--port 8000 \\
--data-parallel-size 2 \\
--api-server-count 2 \\
--data-parallel-size-local 1 \\
--data-parallel-address $local_ip \\
--data-parallel-rpc-port 13389 \\
--seed 1024 \\
--served-model-name qwen3 \\
--tensor-parallel-size 8 \\
--enable-expert-parallel \\
--max-num-seqs 16 \\
--max-model-len 262144 \\
--max-num-batched-tokens 4096 \\
--trust-remote-code \\
--async-scheduling \\
--gpu-memory-utilization 0.9""", """vllm serve Qwen/Qwen3-VL-235B-A22B-Instruct \\
--host 0.0.0.0 \\
--port 8000 \\
--headless \\
--data-parallel-size 2 \\
--data-parallel-size-local 1 \\
--data-parallel-start-rank 1 \\
--data-parallel-address $node0_ip \\
--data-parallel-rpc-port 13389 \\
--seed 1024 \\
--tensor-parallel-size 8 \\
--served-model-name qwen3 \\
--max-num-seqs 16 \\
--max-model-len 262144 \\
--max-num-batched-tokens 4096 \\
--enable-expert-parallel \\
--trust-remote-code \\
--async-scheduling \\
--gpu-memory-utilization 0.9"""]
CURL_MESSAGES = [  # the guides' curl body, its image URL replaced by a local one
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "LOCAL_IMAGE"}},
        {"type": "text", "text": "What is the text in the illustrate?"}]}]
START_S = 300


def _argv(line: str, model: str, port: int) -> list[str]:
    """The guide's line as `qwenvl-pd serve` runs it here: the tiny model, a free port."""
    line = line.replace("\\\n", " ").replace("$local_ip", "10.0.0.1").replace("$node0_ip", "10.0.0.1")
    argv = shlex.split(line)  # as a shell reads it: continuation lines joined
    assert argv[:2] == ["vllm", "serve"]
    argv[2] = model
    if "--port" in argv:
        argv[argv.index("--port") + 1] = str(port)
    else:
        argv += ["--port", str(port)]
    return [sys.executable, "-m", "qwenvl_pd.cli", *argv[1:]]


def _serve(argv: list[str], env: dict) -> tuple[subprocess.Popen, object]:
    log = tempfile.TemporaryFile("w+")
    return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, text=True), log


def _wait(proc, log, url: str) -> None:
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    log.seek(0)
    raise AssertionError(f"serve did not become healthy (exit {proc.poll()}):\n{log.read()[-4000:]}")


def _curl(url: str, model: str) -> dict:
    image = base64.b64encode(png_bytes(Image.new("RGB", (224, 168), (200, 30, 30)))).decode()
    messages = [dict(m) for m in CURL_MESSAGES]
    messages[1] = {**messages[1], "content": [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
        messages[1]["content"][1]]}
    r = httpx.post(url + "/v1/chat/completions", timeout=120, headers={"Content-Type": "application/json"},
                   json={"model": model, "messages": messages, "max_tokens": 8})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("seed", ["000", "001"])
def test_the_guides_serve_lines_start_and_answer_the_guides_curl(tmp_path, tiny_dirs, seed):
    model = str(tmp_path / "tiny")
    if seed == "000":  # a copy of the session's float checkpoint: only its directory's name differs
        line = SEED_000
        shutil.copytree(tiny_dirs["qwen3_vl"], model)
    else:
        line = SEED_001
        make_tiny("qwen2_5_vl", model, quantize="w8a8")
    port = free_port()
    proc, log = _serve(_argv(line, model, port), {**os.environ, "XDG_CACHE_HOME": str(tmp_path)})
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(proc, log, url)
        # vLLM's name for the model: --served-model-name, else the model argument as given
        name = "qwen25_vl" if seed == "001" else model
        assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == name
        reply = _curl(url, name)
        assert reply["model"] == name and reply["choices"][0]["message"]["role"] == "assistant"
        assert reply["usage"]["completion_tokens"] >= 1
        if seed == "000":  # the checkpoint directory's name stays an alias
            assert _curl(url, "tiny")["usage"]["prompt_tokens"] == reply["usage"]["prompt_tokens"]
    finally:
        stop(proc)
    log.seek(0)
    text = log.read()
    if seed == "001":  # each flag that changes nothing here says so, once
        assert text.count("--trust-remote-code has no effect") == 1
        assert text.count("--async-scheduling has no effect") == 1
        assert "--additional-config enable_weight_nz_layout has no effect" in text


@pytest.mark.parametrize("line", SEED_002, ids=["node0", "node1_headless"])
def test_seed_002s_multi_node_data_parallel_lines_are_refused_with_the_commands_here(line):
    proc = subprocess.run(_argv(line, "Qwen/Qwen3-VL-235B-A22B-Instruct", 8000), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "qwenvl-pd serve: error: --data-parallel-size 2 over several machines" in proc.stderr
    assert "qwenvl-pd prefill Qwen/Qwen3-VL-235B-A22B-Instruct --host NODEi --port 50051" in proc.stderr
    assert "--prefill NODE0:50051,NODE1:50051 --decode NODE0:50052,NODE1:50052" in proc.stderr

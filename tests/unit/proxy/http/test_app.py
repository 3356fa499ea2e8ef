"""The OpenAI app end to end in-process, with a scripted backend in place of the PD cluster:
response shapes, usage, n > 1 seeds, stop strings, errors and admission."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from qwenvl_pd.messages import ModelInfo, PromptLogprobs, SampledToken, TokenEvent
from qwenvl_pd.model.grid import expand_placeholders
from qwenvl_pd.model.processor import process_images
from qwenvl_pd.model.vision_config import VisionPreprocessConfig
from qwenvl_pd.proxy.http.app import create_app
from qwenvl_pd.proxy.config import ProxyConfig
from qwenvl_pd.proxy.http.request_run import SEED_STRIDE

PREPROCESSOR = {"patch_size": 14, "merge_size": 2, "temporal_patch_size": 2, "min_pixels": 3136,
                "max_pixels": 12845056}
ANSWER = " The sky is blue, and the grass is green."


def scripted_prompt_logprobs(req) -> PromptLogprobs | None:
    """Prompt token i + 1 scores -0.5 - i / 8 at rank i + 1; the top ones are tokens 11, 12, ..
    at -0.25, -0.5, .."""
    k, n = req.sampling.prompt_logprobs, len(req.prompt_token_ids) - 1
    if k is None:
        return None
    return PromptLogprobs(k, [-0.5 - i / 8 for i in range(n)], [i + 1 for i in range(n)],
                          [11 + j for _ in range(n) for j in range(k)],
                          [-0.25 * (j + 1) for _ in range(n) for j in range(k)])


class ScriptedBackend:
    """Answers every sample with ANSWER's tokens; `gate` (when set) holds tokens after the first."""

    def __init__(self, tokens: list[int]):
        self.tokens, self.requests, self.closed = tokens, [], 0
        self.is_ready, self.gate = True, None

    def ready(self) -> bool:
        return self.is_ready

    async def generate(self, req, key):
        self.requests.append(req)
        n = min(len(self.tokens), req.sampling.max_tokens)
        try:
            for i, t in enumerate(self.tokens[:n]):
                if i and self.gate is not None:
                    await asyncio.to_thread(self.gate.wait)
                yield TokenEvent(SampledToken(t, -0.25, ((t, -0.25), (11, -2.0))), "length" if i == n - 1 else "",
                                 num_cached_tokens=3 if i == 0 else 0,
                                 prompt_logprobs=scripted_prompt_logprobs(req) if i == 0 else None)
        finally:
            self.closed += 1


@pytest.fixture(scope="module")
def info(qwen_tokenizer_dir):
    d = qwen_tokenizer_dir
    return ModelInfo(served_model_name="tiny", family="qwen2_5_vl",
                     tokenizer_json=(d / "tokenizer.json").read_bytes(),
                     tokenizer_config_json=(d / "tokenizer_config.json").read_bytes(),
                     chat_template=json.loads((d / "tokenizer_config.json").read_text())["chat_template"],
                     preprocessor_config_json=json.dumps(PREPROCESSOR), max_model_len=512,
                     eos_token_ids=(151645,), vision_start_token_id=151652, vision_end_token_id=151653,
                     image_token_id=151655, video_token_id=151656)


@pytest.fixture(scope="module", autouse=True)
def one_tokenizer():
    """Building the tokenizer takes a second; every app of this module shares one model."""
    from qwenvl_pd.proxy.http import app
    from qwenvl_pd.proxy.prompt import model_info
    cache = {}

    def build(info, name=""):
        if (id(info), name) not in cache:
            cache[id(info), name] = model_info.build_model(info, name)
        return cache[id(info), name]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(app, "build_model", build)
        yield


def make_client(info, tokens, **cfg):
    backend = ScriptedBackend(tokens)

    async def open_backend(config, metrics):
        async def close():
            pass
        return backend, info, close
    config = ProxyConfig(prefill=("x:1",), decode=("y:1",), **cfg)
    return TestClient(create_app(config, open_backend)), backend


@pytest.fixture()
def client(info, qwen_tokenizer):
    with make_client(info, qwen_tokenizer.encode(ANSWER))[0] as c:
        yield c


def chat(content="Hello", **extra):
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], **extra}


def png_url(w=100, h=80) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 200, 30)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def sse_events(text: str) -> list:
    lines = [ln[len("data: "):] for ln in text.split("\n\n") if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(ln) for ln in lines[:-1]]


def test_chat_with_image_counts_image_tokens_and_expands_like_the_processor(info, qwen_tokenizer):
    c, backend = make_client(info, qwen_tokenizer.encode(ANSWER))
    content = [{"type": "image_url", "image_url": {"url": png_url(100, 80)}}, {"type": "text", "text": "What?"}]
    with c:
        r = c.post("/v1/chat/completions", json=chat(content, max_tokens=50))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["message"] == {"role": "assistant", "content": ANSWER}
    assert body["choices"][0]["finish_reason"] == "length"
    (req,) = backend.requests
    # the header-only grid equals the one the full pixel processor computes
    grids = process_images([base64.b64decode(png_url(100, 80).split(",")[1])],
                           VisionPreprocessConfig(**{k: v for k, v in PREPROCESSOR.items()})).image_grid_thw
    text = qwen_tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                {"type": "text", "text": "What?"}]}],
                                              tokenize=False, add_generation_prompt=True)
    expected = expand_placeholders(qwen_tokenizer.encode(text), grids.tolist(), family="qwen2_5_vl")
    assert list(req.prompt_token_ids) == expected
    assert req.media[0].grid_thw == tuple(grids[0].tolist())
    assert body["usage"] == {"prompt_tokens": len(expected), "completion_tokens": len(backend.tokens),
                             "total_tokens": len(expected) + len(backend.tokens),
                             "prompt_tokens_details": {"cached_tokens": 3}}


def test_stream_with_usage_and_logprobs(client):
    r = client.post("/v1/chat/completions", json=chat(stream=True, stream_options={"include_usage": True},
                                                      logprobs=True, top_logprobs=2))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [e["choices"][0] for e in events[1:-1]]
    assert "".join(d["delta"].get("content", "") for d in deltas) == ANSWER
    assert deltas[-1]["finish_reason"] == "length"
    assert all(len(d["logprobs"]["content"][0]["top_logprobs"]) == 2 for d in deltas)
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == len(deltas)


def test_n_samples_get_derived_seeds(info, qwen_tokenizer):
    c, backend = make_client(info, qwen_tokenizer.encode(ANSWER))
    with c:
        body = c.post("/v1/chat/completions", json=chat(n=3, seed=5, max_tokens=4)).json()
        c.post("/v1/completions", json={"prompt": "hi", "n": 2, "max_tokens": 4})
    assert [ch["index"] for ch in body["choices"]] == [0, 1, 2]
    assert [r.sampling.seed for r in backend.requests] == [5, 5 + SEED_STRIDE, 5 + 2 * SEED_STRIDE, None, None]
    assert {r.sampling.n for r in backend.requests} == {1}
    assert body["usage"]["completion_tokens"] == 12


def test_stop_string_cuts_and_ends_the_sample(info, qwen_tokenizer):
    c, backend = make_client(info, qwen_tokenizer.encode(ANSWER))
    with c:
        body = c.post("/v1/chat/completions", json=chat(stop=["blue"], max_tokens=50)).json()
    assert body["choices"][0]["message"]["content"] == " The sky is "
    assert body["choices"][0]["finish_reason"] == "stop"
    assert backend.closed == 1 and body["usage"]["completion_tokens"] < len(backend.tokens)


def test_completion_default_max_tokens_and_text(client):
    body = client.post("/v1/completions", json={"model": "tiny", "prompt": "Say"}).json()
    assert body["object"] == "text_completion"
    assert body["usage"]["completion_tokens"] == min(16, len(client.app.state.proxy.backend.tokens))


def test_completion_echo_puts_the_prompt_before_the_text(client, qwen_tokenizer):
    ids = qwen_tokenizer.encode(" red sky")
    body = client.post("/v1/completions", json={"prompt": "Say", "echo": True, "max_tokens": 50}).json()
    by_ids = client.post("/v1/completions", json={"prompt": ids, "echo": True, "max_tokens": 50}).json()
    events = sse_events(client.post("/v1/completions", json={
        "prompt": "Say", "echo": True, "stream": True, "max_tokens": 50}).text)
    assert body["choices"][0]["text"] == "Say" + ANSWER
    assert by_ids["choices"][0]["text"] == " red sky" + ANSWER
    assert events[0]["choices"][0]["text"].startswith("Say") and not events[1]["choices"][0]["text"].startswith("Say")
    assert "".join(e["choices"][0]["text"] for e in events) == "Say" + ANSWER
    assert body["usage"]["completion_tokens"] == len(qwen_tokenizer.encode(ANSWER))


def test_completion_echo_with_logprobs_scores_the_prompt_first(client, qwen_tokenizer):
    ids = qwen_tokenizer.encode("Say it red")
    texts = [qwen_tokenizer.decode([t]) for t in ids]
    body = client.post("/v1/completions", json={"prompt": ids, "echo": True, "logprobs": 1,
                                                "max_tokens": 2}).json()
    lp, choice = body["choices"][0]["logprobs"], body["choices"][0]
    assert lp["tokens"][:len(ids) + 1] == texts + [qwen_tokenizer.decode(qwen_tokenizer.encode(ANSWER)[:1])]
    assert lp["token_logprobs"][:len(ids)] == [None] + [-0.5 - i / 8 for i in range(len(ids) - 1)]
    assert lp["top_logprobs"][0] is None and lp["top_logprobs"][1] == {texts[1]: -0.5, ",": -0.25}
    assert lp["text_offset"][:len(ids) + 1] == [sum(map(len, texts[:i])) for i in range(len(ids) + 1)]
    assert len(lp["tokens"]) == len(ids) + 2 and choice["text"].startswith("Say it red")
    # echo's logprobs ask prefill for prompt logprobs, so the choice carries vLLM's list too
    assert choice["prompt_logprobs"][:2] == [None, {
        str(ids[1]): {"logprob": -0.5, "rank": 1, "decoded_token": texts[1]},
        "11": {"logprob": -0.25, "rank": 1, "decoded_token": ","}}]
    streamed = sse_events(client.post("/v1/completions", json={
        "prompt": ids, "echo": True, "logprobs": 1, "max_tokens": 2, "stream": True}).text)
    first, second = (e["choices"][0]["logprobs"] for e in streamed[:2])
    assert first["tokens"] == lp["tokens"][:len(ids) + 1] and first["text_offset"] == lp["text_offset"][:-1]
    assert second["text_offset"] == lp["text_offset"][-1:]  # counting on after the echoed prompt
    assert "prompt_logprobs" not in streamed[0]["choices"][0]


def test_prompt_logprobs_alone_on_completions_and_chat(client, qwen_tokenizer):
    ids = qwen_tokenizer.encode("Say it")
    completion = client.post("/v1/completions", json={"prompt": "Say it", "prompt_logprobs": 0,
                                                      "max_tokens": 1}).json()["choices"][0]
    assert completion["logprobs"] is None and completion["prompt_logprobs"] == [None, {
        str(ids[1]): {"logprob": -0.5, "rank": 1, "decoded_token": " it"}}]
    reply = client.post("/v1/chat/completions", json=chat(prompt_logprobs=2, max_tokens=1)).json()
    assert reply["prompt_logprobs"][0] is None and len(reply["prompt_logprobs"]) == reply["usage"]["prompt_tokens"]
    assert [len(p) for p in reply["prompt_logprobs"][1:]] == [3] * (reply["usage"]["prompt_tokens"] - 1)
    assert "prompt_logprobs" not in client.post("/v1/chat/completions", json=chat(max_tokens=1)).json()


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    (b"[" * 100_000 + b"]" * 100_000, 400, None),  # nesting past Python's recursion limit
    (b'{"model": "tiny", "messages": "hi"}', 400, "messages"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": 5}]}', 400, "messages[0].content"),
    (b'{"model": "other", "messages": [{"role": "user", "content": "x"}]}', 404, "model"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 600}', 400, "max_tokens"),
    (json.dumps(chat([{"type": "image_url", "image_url": {"url": "data:image/png;base64,!!"}}])).encode(),
     400, "messages[0].content[0].image_url.url"),
])
def test_errors_have_openai_bodies_and_schedule_nothing(client, body, status, param):
    r = client.post("/v1/chat/completions", content=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"]
    assert client.app.state.proxy.backend.requests == []


def test_prompt_over_context_is_400(client):
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "word " * 600, "max_tokens": 1})
    assert r.status_code == 400 and "maximum context length" in r.json()["error"]["message"]


def test_api_key(info):
    c, _ = make_client(info, [1], api_keys=("sekret",))
    with c:
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).json()["error"]["code"] == \
            "invalid_api_key"
        ok = c.get("/v1/models", headers={"Authorization": "Bearer sekret"})
        assert ok.status_code == 200 and ok.json()["data"][0]["id"] == "tiny"
        assert c.get("/health").status_code == 200  # probes need no key


def test_overload_is_429_and_slots_come_back(info, qwen_tokenizer):
    c, backend = make_client(info, qwen_tokenizer.encode(ANSWER), max_concurrent_requests=1)
    backend.gate = threading.Event()
    with c:
        first = threading.Thread(target=lambda: c.post("/v1/chat/completions", json=chat()))
        first.start()
        deadline = time.monotonic() + 10
        while not backend.requests and time.monotonic() < deadline:
            time.sleep(0.01)
        r = c.post("/v1/chat/completions", json=chat())
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        backend.gate.set()
        first.join(timeout=10)
        assert c.post("/v1/chat/completions", json=chat()).status_code == 200
        assert c.app.state.proxy.active == 0


def test_health_metrics_version_and_unknown_route(client):
    backend = client.app.state.proxy.backend
    assert client.get("/health").status_code == 200
    backend.is_ready = False
    assert client.get("/health").status_code == 503
    assert client.get("/live").json() == {"status": "alive"}  # liveness ignores the backends
    client.post("/v1/chat/completions", json=chat(max_tokens=2))
    metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert 'qwenvl_pd:request_success_total{finished_reason="length"} 1' in metrics.text
    assert client.get("/version").json() == {"version": "0.1.0"}
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()


def test_video_part_gets_the_processors_grid(info, qwen_tokenizer, mp4):
    from qwenvl_pd.model.vision_config import config_from_dicts
    from qwenvl_pd.model.video import process_videos
    data = mp4()
    c, backend = make_client(info, qwen_tokenizer.encode(ANSWER))
    url = "data:video/mp4;base64," + base64.b64encode(data).decode()
    with c:
        r = c.post("/v1/chat/completions", json=chat([{"type": "video_url", "video_url": {"url": url}},
                                                      {"type": "text", "text": "What happens?"}], max_tokens=4))
    assert r.status_code == 200, r.text
    (item,) = backend.requests[0].media
    want = process_videos([data], config_from_dicts(PREPROCESSOR, "p", None, "v"), "qwen2_5_vl")
    assert item.kind == "video" and item.data == data
    assert item.grid_thw == tuple(want.video_grid_thw[0].tolist())
    assert item.second_per_grid_t == want.second_per_grid_ts[0]
    t, h, w = item.grid_thw
    assert backend.requests[0].prompt_token_ids.count(151656) == t * h * w // 4



@pytest.mark.parametrize("limit, message", [
    ({"max_image_pixels": 64 * 48 - 1}, "video frames are 64x48 = 3072 pixels; the limit is 3071 per frame"),
    ({"max_video_frames": 7}, "the video declares 8 frames; the limit is 7"),
])
def test_a_video_over_the_limits_is_a_400_before_any_decoding(info, qwen_tokenizer, limit, message, mp4):
    c, backend = make_client(info, qwen_tokenizer.encode(ANSWER), **limit)
    url = "data:video/mp4;base64," + base64.b64encode(mp4()).decode()
    with c:
        r = c.post("/v1/chat/completions", json=chat([{"type": "video_url", "video_url": {"url": url}}]))
    assert r.status_code == 400, r.text
    assert r.json()["error"] == {"message": message, "type": "invalid_request_error",
                                 "param": "messages[0].content[0].video_url.url", "code": None}
    assert backend.requests == []

def test_vllm_bench_completion_payload_is_accepted(client):
    # what `vllm bench serve` sends by default (best_of 1 is a no-op; anything else is refused)
    body = {"model": "tiny", "prompt": "the of and", "temperature": 0.0, "best_of": 1, "max_tokens": 4,
            "logprobs": None, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200 and sse_events(r.text)[-1]["usage"]["completion_tokens"] == 4
    r = client.post("/v1/completions", json={**body, "best_of": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "best_of"


def test_a_failure_after_the_first_chunk_ends_the_stream_with_an_error_event_and_done(info, qwen_tokenizer):
    client, backend = make_client(info, qwen_tokenizer.encode(ANSWER))
    scripted = backend.generate

    async def breaks_after_one(req, key):
        async for step in scripted(req, key):
            yield step
            raise RuntimeError("a bug past the status line")
    backend.generate = breaks_after_one
    with client as c:
        r = c.post("/v1/chat/completions", json=chat(stream=True, max_tokens=20))
    assert r.status_code == 200
    assert r.text.rstrip().endswith("data: [DONE]")
    events = sse_events(r.text)
    assert events[-1]["error"]["message"] == "internal error: RuntimeError: a bug past the status line"
    assert events[-1]["error"]["type"] == "server_error"


def test_n_samples_count_n_against_admission(info, qwen_tokenizer):
    c, backend = make_client(info, qwen_tokenizer.encode(ANSWER), max_concurrent_requests=4)
    backend.gate = threading.Event()
    with c:
        first = threading.Thread(target=lambda: c.post("/v1/chat/completions", json=chat(n=3)))
        first.start()
        deadline = time.monotonic() + 10
        while len(backend.requests) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert c.app.state.proxy.active == 3
        assert c.post("/v1/chat/completions", json=chat(n=2)).status_code == 429  # 3 + 2 > 4
        too_many = c.post("/v1/completions", json={"prompt": "hi", "n": 5})
        assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "n"
        backend.gate.set()
        first.join(timeout=10)
        assert c.post("/v1/chat/completions", json=chat(n=4)).status_code == 200
        assert c.app.state.proxy.active == 0


class PrefillCountingBackend(ScriptedBackend):
    """Counts samples between their start and their first event (their prefill), at most at once."""

    def __init__(self, tokens):
        super().__init__(tokens)
        self.prefilling = self.most = 0

    async def generate(self, req, key):
        self.prefilling += 1
        self.most = max(self.most, self.prefilling)
        await asyncio.sleep(0.02)  # long enough for every sample let through to be here too
        self.prefilling -= 1
        async for ev in super().generate(req, key):
            yield ev


@pytest.mark.parametrize("with_image, most", [(True, 2), (False, 6)])
def test_n_samples_carry_media_to_prefill_two_at_a_time(info, qwen_tokenizer, with_image, most):
    c, backend = make_client(info, qwen_tokenizer.encode(ANSWER))
    backend.__class__ = PrefillCountingBackend
    backend.prefilling = backend.most = 0
    content = [{"type": "image_url", "image_url": {"url": png_url()}}, {"type": "text", "text": "?"}] \
        if with_image else "Hello"
    with c:
        body = c.post("/v1/chat/completions", json=chat(content, n=6, max_tokens=3)).json()
    assert [ch["finish_reason"] for ch in body["choices"]] == ["length"] * 6
    assert backend.most == most


def test_media_times_n_over_the_bound_is_a_400(info, qwen_tokenizer):
    url = png_url()
    size = len(base64.b64decode(url.split(",")[1]))
    c, backend = make_client(info, qwen_tokenizer.encode(ANSWER), max_request_media_bytes=3 * size)
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}]
    with c:
        assert c.post("/v1/chat/completions", json=chat(content, n=3, max_tokens=2)).status_code == 200
        r = c.post("/v1/chat/completions", json=chat(content, n=4, max_tokens=2))
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    assert r.json()["error"]["message"] == (f"the request's media ({size} bytes) times n (4) is more than "
                                            f"{3 * size} bytes (--max-request-media-bytes)")
    assert len(backend.requests) == 3

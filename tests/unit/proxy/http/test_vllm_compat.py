"""What vLLM's server (and OpenAI's) accept that clients send by default: usage on every chunk,
batches of prompts, the developer role, logit_bias, model retrieval, HEAD, /tokenize and
/detokenize."""
from __future__ import annotations

import pytest

from test_app import ANSWER, chat, info, make_client, one_tokenizer, png_url, sse_events  # noqa: F401


@pytest.fixture()
def client_backend(info, qwen_tokenizer):  # noqa: F811
    c, backend = make_client(info, qwen_tokenizer.encode(ANSWER), served_model_name="/ckpt/Qwen-tiny")
    with c:
        yield c, backend


def test_continuous_usage_stats_put_the_usage_so_far_on_every_chunk(client_backend):
    c, _ = client_backend
    r = c.post("/v1/chat/completions", json=chat(stream=True, max_tokens=3, model=None, stream_options={
        "include_usage": True, "continuous_usage_stats": True}))
    assert r.status_code == 200, r.text
    events = sse_events(r.text)
    prompt = events[-1]["usage"]["prompt_tokens"]
    assert [e["usage"]["completion_tokens"] for e in events] == [0, 1, 2, 3, 3]
    assert {e["usage"]["prompt_tokens"] for e in events} == {prompt}
    assert all(e["usage"]["total_tokens"] == prompt + e["usage"]["completion_tokens"] for e in events)


def test_a_batch_of_prompts_gets_choices_numbered_prompt_by_prompt(client_backend, qwen_tokenizer):
    c, backend = client_backend
    body = {"prompt": ["Red", "Green sky"], "n": 2, "echo": True, "max_tokens": 2}
    r = c.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    answer = qwen_tokenizer.decode(qwen_tokenizer.encode(ANSWER)[:2])
    choices = r.json()["choices"]
    assert [(ch["index"], ch["text"]) for ch in choices] == [
        (0, "Red" + answer), (1, "Red" + answer), (2, "Green sky" + answer), (3, "Green sky" + answer)]
    prompt_tokens = len(qwen_tokenizer.encode("Red")) + len(qwen_tokenizer.encode("Green sky"))
    assert r.json()["usage"]["prompt_tokens"] == prompt_tokens and r.json()["usage"]["completion_tokens"] == 8
    assert sorted(len(q.prompt_token_ids) for q in backend.requests) == sorted(
        [len(qwen_tokenizer.encode("Red"))] * 2 + [len(qwen_tokenizer.encode("Green sky"))] * 2)
    events = sse_events(c.post("/v1/completions", json={**body, "stream": True}).text)
    texts = {}
    for e in events:
        for ch in e["choices"]:
            texts[ch["index"]] = texts.get(ch["index"], "") + ch["text"]
    assert texts == {ch["index"]: ch["text"] for ch in choices}


def test_developer_role_is_the_system_prompt(client_backend):
    c, backend = client_backend
    for role in ("system", "developer"):
        r = c.post("/v1/chat/completions", json={"messages": [
            {"role": role, "content": "Be brief."}, {"role": "user", "content": "Hi"}], "max_tokens": 1})
        assert r.status_code == 200, r.text
    assert backend.requests[0].prompt_token_ids == backend.requests[1].prompt_token_ids


def test_logit_bias_reaches_the_sampler_and_ids_past_the_vocabulary_are_400(client_backend, qwen_tokenizer):
    c, backend = client_backend
    r = c.post("/v1/chat/completions", json=chat(max_tokens=1, model=None, logit_bias={"15": 7, "9": -300}))
    assert r.status_code == 200, r.text
    assert backend.requests[0].sampling.logit_bias == {15: 7.0, 9: -100.0}
    r = c.post("/v1/completions", json={"prompt": "x", "logit_bias": {str(len(qwen_tokenizer)): 1}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias"
    assert len(backend.requests) == 1


def test_models_are_retrieved_by_name_or_alias_and_unknown_ones_are_404(client_backend):
    c, backend = client_backend
    assert c.get("/v1/models").json()["data"][0]["id"] == "/ckpt/Qwen-tiny"
    for name in ("/ckpt/Qwen-tiny", "Qwen-tiny"):
        got = c.get(f"/v1/models/{name}")
        assert got.status_code == 200 and got.json()["id"] == name and got.json()["object"] == "model"
        assert c.post("/v1/completions", json={"model": name, "prompt": "x", "max_tokens": 1}).status_code == 200
    missing = c.get("/v1/models/other")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("path", ["/v1/models", "/v1/models/Qwen-tiny", "/health", "/live", "/metrics",
                                  "/version"])
def test_head_answers_every_get_route(client_backend, path):
    c, _ = client_backend
    r = c.head(path)
    assert r.status_code == 200 and r.content == b""


def test_tokenize_and_detokenize_as_vllm_serves_them(client_backend, qwen_tokenizer):
    c, backend = client_backend
    ids = qwen_tokenizer.encode("Hello world")
    r = c.post("/tokenize", json={"prompt": "Hello world", "return_token_strs": True}).json()
    assert r == {"count": len(ids), "max_model_len": 512, "tokens": ids,
                 "token_strs": qwen_tokenizer.convert_ids_to_tokens(ids)}
    content = [{"type": "image_url", "image_url": {"url": png_url()}}, {"type": "text", "text": "What?"}]
    chat_ids = c.post("/tokenize", json={"messages": [{"role": "user", "content": content}]}).json()["tokens"]
    c.post("/v1/chat/completions", json=chat(content, max_tokens=1, model=None))
    assert chat_ids == list(backend.requests[0].prompt_token_ids)  # placeholders expanded alike
    assert c.post("/detokenize", json={"tokens": ids}).json() == {"prompt": "Hello world"}
    bad = c.post("/detokenize", json={"tokens": [len(qwen_tokenizer)]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    assert c.post("/tokenize", json={"model": "nope", "prompt": "x"}).status_code == 404


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("spaces", [True, False])
def test_special_token_options_per_request_give_transformers_text(info, qwen_tokenizer, skip, spaces):  # noqa: F811
    ids = qwen_tokenizer.encode("<|im_start|>hi<|vision_start|><|vision_end|> x<tool_call>y")
    c, _ = make_client(info, ids)
    with c:
        r = c.post("/v1/chat/completions", json=chat(max_tokens=len(ids), skip_special_tokens=skip,
                                                     spaces_between_special_tokens=spaces))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == qwen_tokenizer.decode(
        ids, skip_special_tokens=skip, spaces_between_special_tokens=spaces)


WEATHER_TOOL = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
CALL_TEXT = 'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>'


def test_streamed_tool_calls_come_as_vllm_streams_them_and_equal_the_whole_reply(info, qwen_tokenizer):  # noqa: F811
    ids = qwen_tokenizer.encode(CALL_TEXT)
    c, _ = make_client(info, ids)
    body = chat("Weather in Paris?", max_tokens=len(ids), tools=WEATHER_TOOL)
    with c:
        whole = c.post("/v1/chat/completions", json=body).json()["choices"][0]
        events = sse_events(c.post("/v1/chat/completions", json={**body, "stream": True}).text)
    (call,) = whole["message"]["tool_calls"]
    assert whole["message"]["content"] == "Sure." and call["function"] == {
        "name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'}
    deltas = [e["choices"][0]["delta"] for e in events[1:]]
    assert all(d for d in deltas[:-1])  # no empty chunk while text is held
    started = next(k for k, d in enumerate(deltas) if "tool_calls" in d)
    first = deltas[started]["tool_calls"][0]
    assert (first["index"], first["type"], first["function"]["name"]) == (0, "function", "get_weather")
    assert first["id"].startswith("call_")
    assert not any("content" in d for d in deltas[started:])  # content stays null once a call starts
    fragments = [d["tool_calls"][0]["function"]["arguments"] for d in deltas[started:] if "tool_calls" in d]
    assert len(fragments) > 3 and "".join(fragments) == call["function"]["arguments"]
    assert "".join(d.get("content", "") for d in deltas[:started]) == whole["message"]["content"]
    assert events[-1]["choices"][0]["finish_reason"] == whole["finish_reason"]

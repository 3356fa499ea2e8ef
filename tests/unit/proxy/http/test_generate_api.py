"""POST /generate, MindIE's vLLM-style endpoint, on the in-process app with the scripted backend
of test_app: string and content-part prompts, n, streaming, and its errors."""
from __future__ import annotations

import base64
import json

import pytest
from test_app import ANSWER, chat, info, make_client, one_tokenizer, png_url  # noqa: F401 (fixtures)

FORM = {"Content-Type": "application/x-www-form-urlencoded"}  # what `curl -d` sends


@pytest.fixture()
def app(info, qwen_tokenizer):  # noqa: F811
    c, backend = make_client(info, qwen_tokenizer.encode(ANSWER))
    with c:
        yield c, backend


def test_string_prompt_is_sent_as_is_and_repeated_before_each_output(app, qwen_tokenizer):
    c, backend = app
    r = c.post("/generate", content=json.dumps({"prompt": "My name is", "max_tokens": 50, "n": 2}),
               headers=FORM)
    assert r.status_code == 200, r.text
    assert r.json() == {"text": ["My name is" + ANSWER] * 2}
    assert [list(q.prompt_token_ids) for q in backend.requests] == [qwen_tokenizer.encode("My name is")] * 2


def test_part_list_prompt_is_one_user_turn_like_chat(app):
    c, backend = app
    parts = [{"type": "text", "text": "描述这张图片"}, {"type": "image_url", "image_url": png_url(100, 80)}]
    r = c.post("/generate", json={"prompt": parts, "max_tokens": 50, "model": "tiny"})
    assert r.status_code == 200, r.text
    assert r.json() == {"text": [ANSWER]}
    assert c.post("/v1/chat/completions", json=chat(parts, max_tokens=50)).status_code == 200
    generate_req, chat_req = backend.requests
    assert generate_req.prompt_token_ids == chat_req.prompt_token_ids
    assert generate_req.media[0].grid_thw == chat_req.media[0].grid_thw == (1, 6, 8)


def test_stream_sends_the_text_so_far_after_each_token(app, qwen_tokenizer):
    c, _ = app
    r = c.post("/generate", json={"prompt": "Hi", "max_tokens": 50, "stream": True})
    assert r.status_code == 200, r.text
    assert r.content.endswith(b"\0")
    updates = [json.loads(u) for u in r.content.decode().split("\0")[:-1]]
    assert len(updates) == len(qwen_tokenizer.encode(ANSWER))
    assert updates[-1] == {"text": ["Hi" + ANSWER]}
    texts = [u["text"][0] for u in updates]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))


def test_a_bare_local_path_reads_the_file_under_the_allowed_directory(info, qwen_tokenizer, tmp_path):  # noqa: F811
    image = tmp_path / "cat.png"
    image.write_bytes(base64.b64decode(png_url(100, 80).split(",")[1]))
    c, backend = make_client(info, qwen_tokenizer.encode(ANSWER), allowed_local_media_path=str(tmp_path))
    with c:
        r = c.post("/generate", json={"prompt": [{"type": "image_url", "image_url": str(image)}]})
        outside = c.post("/generate", json={"prompt": [{"type": "image_url", "image_url": "/etc/hostname"}]})
    assert r.status_code == 200, r.text
    assert backend.requests[0].media[0].grid_thw == (1, 6, 8)
    assert outside.status_code == 400
    assert outside.json()["error"]["param"] == "prompt[0].image_url.url"
    assert "outside the allowed local media directory" in outside.json()["error"]["message"]
    assert len(backend.requests) == 1


@pytest.mark.parametrize("body, param, words", [
    ('{"prompt": ""}', "prompt", "non-empty string"),
    ('{"prompt": [{"type": "audio_url", "audio_url": "/a.mp3"}]}', "prompt[0].type", "unknown content part"),
    ('{"prompt": [{"type": "image_url", "image_url": "/tmp/x.png"}]}', "prompt[0].image_url.url",
     "file:// URLs are disabled"),
    ('{"prompt": "hi", "use_beam_search": true}', "use_beam_search", "not supported"),
    ('{"prompt": "hi", "max_tokens": 0}', "max_tokens", ">= 1"),
    ('{"prompt": [{"type": "text", "text": "x"}，{"type": "text", "text": "y"}]}', None,
     "FULLWIDTH COMMA"),
])
def test_errors_name_the_field_and_schedule_nothing(app, body, param, words):
    c, backend = app
    r = c.post("/generate", content=body.encode(), headers=FORM)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"]
    assert backend.requests == []

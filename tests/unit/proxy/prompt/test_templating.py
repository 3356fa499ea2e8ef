"""Chat templates render exactly as transformers' apply_chat_template does."""

from __future__ import annotations

import json
from importlib import resources

import jinja2
import pytest

from qwenvl_pd.proxy.errors import APIError
from qwenvl_pd.proxy.protocol import parse_chat_request
from qwenvl_pd.proxy.prompt.templating import ChatTemplate, special_tokens_from_config, template_messages

IMG = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
VID = {"type": "video_url", "video_url": {"url": "https://example.com/v.mp4"}}
CONVERSATIONS = {
    "text": [{"role": "user", "content": "Hello!"}],
    "multimodal": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "Compare "}, IMG,
                                     {"type": "text", "text": " and "}, IMG, VID]},
        {"role": "assistant", "content": "They differ. <b>&</b>"},
        {"role": "user", "content": [VID, {"type": "text", "text": "你好 and this?"}]},
    ],
    "parts_only": [{"role": "user", "content": [IMG]}],
}


def source(family: str) -> str:
    return (resources.files("qwenvl_pd.model") / "templates" / f"{family}.jinja").read_text()


def hf_messages(messages):
    """What a client would hand transformers: OpenAI parts with images as {"type": "image"}."""
    kinds = {"image_url": {"type": "image"}, "video_url": {"type": "video"}}
    return [{**m, "content": m["content"] if isinstance(m["content"], str)
             else [kinds.get(p["type"], p) for p in m["content"]]} for m in messages]


@pytest.fixture(scope="module")
def specials(qwen_tokenizer_dir):
    return special_tokens_from_config((qwen_tokenizer_dir / "tokenizer_config.json").read_bytes())


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("kwargs", [{}, {"add_generation_prompt": False}, {"add_vision_id": True}])
def test_matches_transformers(qwen_tokenizer, specials, family, name, kwargs):
    raw = CONVERSATIONS[name]
    request = parse_chat_request({"model": "m", "messages": raw})
    agp = kwargs.get("add_generation_prompt", True)
    extra = {k: v for k, v in kwargs.items() if k != "add_generation_prompt"}
    ours = ChatTemplate(source(family), specials).render(request.messages, agp, extra)
    # qwen2.5's template is the tokenizer's own (tokenizer_config.json); qwen3's is passed in
    theirs = qwen_tokenizer.apply_chat_template(
        hf_messages(raw), tokenize=False, **({"add_generation_prompt": True} | kwargs),
        **({} if family == "qwen2_5_vl" else {"chat_template": source(family)}))
    assert ours == theirs
    assert ours.count("<|image_pad|>") == sum(p == IMG for m in raw if isinstance(m["content"], list)
                                              for p in m["content"])


def test_template_messages_shape():
    request = parse_chat_request({"messages": CONVERSATIONS["multimodal"]})
    assert template_messages(request.messages)[1] == {"role": "user", "content": [
        {"type": "text", "text": "Compare "}, {"type": "image"}, {"type": "text", "text": " and "},
        {"type": "image"}, {"type": "video"}]}


def test_special_tokens_from_config():
    cfg = {"eos_token": "<|im_end|>", "bos_token": None, "pad_token": {"content": "<|endoftext|>"},
           "unk_token": 3, "chat_template": "x"}
    assert special_tokens_from_config(cfg) == {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    assert special_tokens_from_config(json.dumps(cfg)) == special_tokens_from_config(cfg.copy())


def render(src: str, content="hi", **kwargs) -> str:
    request = parse_chat_request({"messages": [{"role": "user", "content": content}]})
    return ChatTemplate(src, {"eos_token": "<|im_end|>"}).render(request.messages, template_kwargs=kwargs)


def test_environment_features_hf_templates_use():
    assert render("{{ eos_token }}") == "<|im_end|>"
    assert render("{{ messages[0]['content'] | tojson }}", "<b>&\"") == '"<b>&\\""'  # no HTML escaping
    assert render("{% for m in messages %}{% if true %}{% break %}{% endif %}x{% endfor %}y") == "y"
    assert render("{% generation %}kept{% endgeneration %}") == "kept"
    assert render("{% set ns = namespace(n=1) %}{% set ns.n = ns.n + 1 %}{{ ns.n }}") == "2"
    assert render("{{ flag }}", flag="on") == "on"
    assert len(render("{{ strftime_now('%Y') }}")) == 4


def test_kwargs_cannot_replace_the_conversation():
    assert render("{{ messages[0]['content'] }}|{{ add_generation_prompt }}", "hi",
                  messages="evil", add_generation_prompt="x") == "hi|True"


def test_raise_exception_is_a_400():
    with pytest.raises(APIError) as info:
        render("{{ raise_exception('Conversation roles must alternate') }}")
    assert info.value.status == 400 and info.value.param == "messages"
    assert "roles must alternate" in info.value.message


@pytest.mark.parametrize("src", [
    "{{ messages.append(1) }}",  # the environment is immutable
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{% set ns = namespace(_secret=1) %}",
])
def test_sandbox_refuses_unsafe_templates(src):
    # a SecurityError is the template's fault, so it is not dressed up as the client's 400
    with pytest.raises(jinja2.exceptions.SecurityError):
        render(src)


def test_plain_text_in_a_sandbox_attribute_probe_renders_empty():
    assert render("{{ ''.__class__ }}x") == "x"


def test_bad_template_source():
    with pytest.raises(ValueError, match="does not compile"):
        ChatTemplate("{% for %}")

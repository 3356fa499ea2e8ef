"""OpenAI request validation (every failure a 400 naming the field) and response shapes."""

from __future__ import annotations

import json

import pytest

from qwenvl_pd.proxy import errors
from qwenvl_pd.proxy.errors import APIError
from qwenvl_pd.proxy.protocol import (
    ChatMessage,
    ImagePart,
    TextPart,
    VideoPart,
    parse_chat_request,
    parse_completion_request,
)
from qwenvl_pd.proxy.responses import (
    SSE_DONE,
    Choice,
    ChunkBuilder,
    TokenLogprob,
    TopLogprob,
    chat_completion,
    completion,
    model_list,
    sse,
    sse_error,
    usage,
)

IMG = "data:image/png;base64,iVBORw0KGgo="


def chat(**over):
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **over}


def bad(fn, body) -> APIError:
    with pytest.raises(APIError) as info:
        fn(body)
    assert info.value.status == 400
    assert info.value.body()["error"]["type"] == "invalid_request_error"
    return info.value


# ---- errors -----------------------------------------------------------------------------------

def test_error_helpers_status_and_body():
    assert errors.bad_request("x", "messages").body() == {
        "error": {"message": "x", "type": "invalid_request_error", "param": "messages", "code": None}}
    assert errors.not_found_model("foo").status == 404
    assert errors.not_found_model("foo").body()["error"]["code"] == "model_not_found"
    assert "foo" in errors.not_found_model("foo").message
    assert errors.unauthorized().status == 401
    assert errors.overloaded().status == 429
    e = errors.no_backend("decode")
    assert (e.status, e.body()["error"]["code"]) == (503, "no_backend") and "decode" in e.message
    assert errors.server_error("boom").status == 500


# ---- chat requests ----------------------------------------------------------------------------

def test_minimal_chat_defaults():
    r = parse_chat_request(chat())
    assert r.model == "m"
    assert r.messages == (ChatMessage("user", "hi"),)
    assert (r.stream, r.include_usage, r.n, r.max_tokens, r.stop) == (False, False, 1, None, ())
    assert (r.logprobs, r.top_logprobs, r.sampling.logprobs) == (False, None, None)
    assert r.add_generation_prompt and r.chat_template_kwargs == {}
    s = r.sampling
    assert (s.temperature, s.top_p, s.top_k, s.min_p, s.seed) == (1.0, 1.0, -1, 0.0, None)


def test_chat_parts_normalised():
    r = parse_chat_request(chat(messages=[
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [
            {"type": "text", "text": "what is"},
            {"type": "image_url", "image_url": {"url": IMG, "detail": "high"}},
            {"type": "image_url", "image_url": "https://example.com/a.png"},
            {"type": "video_url", "video_url": {"url": "file:///data/v.mp4"}}]},
        {"role": "assistant", "content": None}]))
    assert r.messages[1].content == (TextPart("what is"), ImagePart(IMG, "high"),
                                      ImagePart("https://example.com/a.png"), VideoPart("file:///data/v.mp4"))
    assert r.messages[0].parts == (TextPart("be brief"),)
    assert r.messages[2] == ChatMessage("assistant", "")


def test_a_bare_server_path_becomes_a_file_url():
    # MindIE's guides pass local paths; they then meet the same guard as file:// URLs
    r = parse_chat_request(chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": "/data/my cat.png"},
        {"type": "video_url", "video_url": {"url": "/data/v#1.mp4"}}]}]))
    assert r.messages[0].content == (ImagePart("file:///data/my%20cat.png"),
                                      VideoPart("file:///data/v%231.mp4"))


def test_sampling_fields_map_to_sampling_params():
    r = parse_chat_request(chat(
        temperature=0, top_p=0.5, top_k=5, min_p=0.1, seed=-3, stop="END", stop_token_ids=[7, 8],
        presence_penalty=0.5, frequency_penalty=-0.5, repetition_penalty=1.2, ignore_eos=True,
        min_tokens=2, n=3, max_tokens=100, max_completion_tokens=20, logprobs=True, top_logprobs=4,
        stream=True, stream_options={"include_usage": True}, skip_special_tokens=False))
    s = r.sampling
    assert (s.temperature, s.top_p, s.top_k, s.min_p, s.seed) == (0.0, 0.5, 5, 0.1, -3)
    assert (s.stop, s.stop_token_ids, s.ignore_eos, s.min_tokens, s.n) == (["END"], [7, 8], True, 2, 3)
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty) == (0.5, -0.5, 1.2)
    assert s.max_tokens == 20 and r.max_tokens == 20  # max_completion_tokens wins
    assert (r.logprobs, r.top_logprobs, s.logprobs, s.skip_special_tokens) == (True, 4, 4, False)
    assert (r.stream, r.include_usage, r.stop, r.n) == (True, True, ("END",), 3)


def test_do_sample_false_is_greedy_as_in_the_mindie_guide():
    # the guide's chat request: sampling knobs set, do_sample false
    off = parse_chat_request(chat(temperature=1.0, top_p=0.5, top_k=10, do_sample=False))
    on = parse_chat_request(chat(temperature=0.7, do_sample=True))
    assert (off.sampling.temperature, off.sampling.top_p, off.sampling.top_k) == (0.0, 0.5, 10)
    assert on.sampling.temperature == 0.7
    assert bad(parse_chat_request, chat(do_sample="no")).param == "do_sample"


def test_top_k_zero_is_off_and_logprobs_without_top():
    r = parse_chat_request(chat(top_k=0, logprobs=True, max_tokens=5))
    assert (r.sampling.top_k, r.sampling.logprobs, r.max_tokens) == (-1, 0, 5)


@pytest.mark.parametrize("over, param", [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"min_p": 2}, "min_p"),
    ({"seed": 2**64}, "seed"),
    ({"seed": True}, "seed"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": -1}, "max_completion_tokens"),
    ({"max_tokens": 4, "min_tokens": 5}, "min_tokens"),
    ({"n": 0}, "n"),
    ({"n": 1000}, "n"),
    ({"stop": ["ok", ""]}, "stop"),
    ({"stop": 3}, "stop"),
    ({"stop": ["x"] * 65}, "stop"),
    ({"stop_token_ids": [1, -1]}, "stop_token_ids"),
    ({"stop_token_ids": list(range(1025))}, "stop_token_ids"),
    ({"stop": ["x" * 1025]}, "stop"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"ignore_eos": "yes"}, "ignore_eos"),
    ({"logprobs": 1}, "logprobs"),
    ({"top_logprobs": 3}, "top_logprobs"),  # without logprobs: true
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),  # stream is false
    ({"stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
    ({"stream": True, "stream_options": []}, "stream_options"),
    ({"stream": "true"}, "stream"),
    ({"model": 5}, "model"),
    ({"temperature": float("nan")}, "temperature"),
    ({"tools": [{"type": "function"}]}, "tools[0]"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {
        "type": "function", "function": {"name": "g"}}}, "tool_choice.function.name"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "foo"}}}},
     "response_format"),
    ({"chat_template_kwargs": []}, "chat_template_kwargs"),
])
def test_chat_field_errors_name_the_field(over, param):
    assert bad(parse_chat_request, chat(**over)).param == param


@pytest.mark.parametrize("messages, param", [
    (None, "messages"),
    ([], "messages"),
    ("hi", "messages"),
    (["hi"], "messages[0]"),
    ([{"role": "robot", "content": "x"}], "messages[0].role"),
    ([{"role": "user"}], "messages[0].content"),
    ([{"role": "user", "content": 5}], "messages[0].content"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": ["x"]}], "messages[1].content[0]"),
    ([{"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": "x"}}]}],
     "messages[0].content[0].type"),
    ([{"role": "user", "content": [{"text": "no type"}]}], "messages[0].content[0].type"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "messages[0].content[0].text"),
    ([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {}}]}],
     "messages[0].content[1].image_url.url"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://h/x.png"}}]}],
     "messages[0].content[0].image_url.url"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "no-scheme"}}]}],
     "messages[0].content[0].image_url.url"),
    ([{"role": "user", "content": [{"type": "video_url", "video_url": None}]}],
     "messages[0].content[0].video_url.url"),
])
def test_message_errors_name_the_path(messages, param):
    assert bad(parse_chat_request, chat(messages=messages)).param == param


def test_body_must_be_object():
    assert bad(parse_chat_request, [1]).param is None
    assert bad(parse_completion_request, "x").param is None


# ---- completion requests ----------------------------------------------------------------------

def test_completion_request():
    r = parse_completion_request({"model": "m", "prompt": "Once", "logprobs": 2, "stop": ["\n"]})
    assert (r.prompt, r.logprobs, r.sampling.logprobs, r.max_tokens, r.stop) == ("Once", 2, 2, 16, ("\n",))
    assert parse_completion_request({"prompt": [1, 2, 3]}).prompt == (1, 2, 3)
    assert parse_completion_request({"prompt": ["one"]}).prompt == "one"
    assert parse_completion_request({"prompt": [[4, 5]], "max_tokens": 3}).prompt == (4, 5)
    assert parse_completion_request({"prompt": "x"}).model is None


@pytest.mark.parametrize("over, param", [
    ({"prompt": ""}, "prompt"),
    ({"prompt": ["a", ""]}, "prompt"),  # every prompt of a batch non-empty
    ({"prompt": [[1], []]}, "prompt"),
    ({"prompt": ["a"] * 129}, "prompt"),  # MAX_PROMPTS
    ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"logit_bias": {"-1": 1}}, "logit_bias"),
    ({"logit_bias": {"5": "high"}}, "logit_bias"),
    ({"logit_bias": [5]}, "logit_bias"),
    ({"stream": True, "stream_options": {"continuous_usage_stats": "yes"}},
     "stream_options.continuous_usage_stats"),
    ({"prompt": [1, -2]}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"logprobs": True}, "logprobs"),
    ({"logprobs": 21}, "logprobs"),
    ({"prompt_logprobs": -1}, "prompt_logprobs"),  # the whole vocabulary: not served
    ({"prompt_logprobs": 21}, "prompt_logprobs"),
    ({"prompt_logprobs": 1.0}, "prompt_logprobs"),
    ({"prompt_logprobs": True}, "prompt_logprobs"),
    ({"prompt_logprobs": 2, "stream": True}, "prompt_logprobs"),  # vLLM's rule: chunks carry none
    ({"suffix": "x"}, "suffix"),
    ({"best_of": 2}, "best_of"),
])
def test_completion_errors(over, param):
    assert bad(parse_completion_request, {"prompt": "p", **over}).param == param


def test_vllm_and_openai_extras_are_read():
    batch = parse_completion_request({"prompt": ["a", "b"], "logit_bias": {"7": 150, "9": -0.5}})
    assert batch.prompts == ("a", "b") and batch.sampling.logit_bias == {7: 100.0, 9: -0.5}
    assert parse_completion_request({"prompt": [[1, 2], [3]]}).prompts == ((1, 2), (3,))
    assert parse_completion_request({"prompt": ["a"]}).prompts == ("a",)
    streamed = dict(stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True})
    assert parse_completion_request({"prompt": "p", **streamed}).continuous_usage
    streamed["stream_options"]["include_usage"] = False  # vLLM: only together with include_usage
    assert not parse_completion_request({"prompt": "p", **streamed}).continuous_usage
    chat = parse_chat_request({"messages": [{"role": "developer", "content": "Be brief."},
                                            {"role": "user", "content": "Hi"}],
                               "spaces_between_special_tokens": False})
    assert chat.messages[0].role == "system" and not chat.sampling.spaces_between_special_tokens


def test_prompt_logprobs_follow_vllm():
    def sampled(**body):
        return parse_completion_request({"prompt": "p", **body}).sampling.prompt_logprobs
    assert sampled() is None and sampled(echo=True) is None and sampled(logprobs=3) is None
    assert sampled(echo=True, logprobs=3) == 3  # the echoed prompt is scored like the completion
    assert sampled(echo=True, logprobs=3, prompt_logprobs=0) == 0 and sampled(prompt_logprobs=20) == 20
    assert sampled(prompt_logprobs=0, stream=True) is None  # nothing would carry them
    assert sampled(echo=True, logprobs=1, stream=True) == 1  # the first chunk's logprobs do
    assert parse_chat_request({"messages": [{"role": "user", "content": "x"}],
                               "prompt_logprobs": 2}).sampling.prompt_logprobs == 2
    err = bad(parse_completion_request, {"prompt": "p", "prompt_logprobs": -1})
    assert err.message == "'prompt_logprobs' -1 (the whole vocabulary) is not supported by this " \
                          "server; at most 20"
    err = bad(parse_chat_request, {"messages": [{"role": "user", "content": "x"}], "stream": True,
                                   "prompt_logprobs": 1})
    assert (err.param, err.message) == ("prompt_logprobs", "'prompt_logprobs' is not available "
                                                           "when 'stream' is true")


# ---- responses --------------------------------------------------------------------------------

LP = (TokenLogprob("Hi", -0.25, (72, 105),
                   (TopLogprob("Hi", -0.25, (72, 105)), TopLogprob("Yo", -1.5, (89, 111)))),
      TokenLogprob("!", float("-inf"), (33,), ()))


def test_usage_dict():
    assert usage(10, 3, 4) == {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13,
                               "prompt_tokens_details": {"cached_tokens": 4}}


def test_chat_completion_object_with_logprobs():
    out = chat_completion("chatcmpl-1", "m", [Choice(0, "Hi!", "stop", LP)], usage(5, 2), created=7)
    assert out == {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 7, "model": "m",
        "usage": usage(5, 2),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi!"}, "finish_reason": "stop",
                     "logprobs": {"content": [
                         {"token": "Hi", "logprob": -0.25, "bytes": [72, 105], "top_logprobs": [
                             {"token": "Hi", "logprob": -0.25, "bytes": [72, 105]},
                             {"token": "Yo", "logprob": -1.5, "bytes": [89, 111]}]},
                         {"token": "!", "logprob": -9999.0, "bytes": [33], "top_logprobs": []}]}}]}
    json.dumps(out, allow_nan=False)  # no -inf leaks into JSON


def test_completion_object_with_logprobs():
    out = completion("cmpl-1", "m", [Choice(0, "Hi!", "length", LP), Choice(1, "x", "stop")], usage(5, 2),
                     created=7)
    assert out["object"] == "text_completion" and out["choices"][1]["logprobs"] is None
    assert out["choices"][0] == {"index": 0, "text": "Hi!", "finish_reason": "length", "logprobs": {
        "tokens": ["Hi", "!"], "token_logprobs": [-0.25, -9999.0],
        "top_logprobs": [{"Hi": -0.25, "Yo": -1.5}, {"!": -9999.0}], "text_offset": [0, 2]}}


def test_chat_stream_chunks_in_order():
    b = ChunkBuilder("chatcmpl-9", "m", chat=True, include_usage=True, created=3)
    head = {"id": "chatcmpl-9", "object": "chat.completion.chunk", "created": 3, "model": "m"}
    assert b.role() == {**head, "usage": None, "choices": [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]}
    assert b.delta("Hel") == {**head, "usage": None, "choices": [
        {"index": 0, "delta": {"content": "Hel"}, "logprobs": None, "finish_reason": None}]}
    assert b.delta("!", logprobs=LP[1:])["choices"][0]["logprobs"]["content"][0]["token"] == "!"
    assert b.finish("stop")["choices"] == [
        {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]
    assert b.finish("length", index=1, text="lo")["choices"][0]["delta"] == {"content": "lo"}
    assert b.usage(usage(4, 2)) == {**head, "choices": [], "usage": usage(4, 2)}


def test_completion_stream_chunks_without_usage():
    b = ChunkBuilder("cmpl-9", "m", chat=False, created=3)
    assert b.delta("a") == {"id": "cmpl-9", "object": "text_completion", "created": 3, "model": "m",
                            "choices": [{"index": 0, "text": "a", "logprobs": None, "finish_reason": None}]}
    assert "usage" not in b.finish("stop")
    assert b.finish("stop")["choices"][0]["finish_reason"] == "stop"


def test_sse_framing_and_models():
    assert sse({"a": "é"}) == 'data: {"a":"é"}\n\n'
    assert SSE_DONE == "data: [DONE]\n\n"
    assert json.loads(sse_error(errors.no_backend("decode"))[6:])["error"]["code"] == "no_backend"
    assert model_list(["m"], 4096, created=1) == {"object": "list", "data": [
        {"id": "m", "object": "model", "created": 1, "owned_by": "qwenvl-pd", "max_model_len": 4096}]}


def test_prompt_logprobs_and_echo_entries_take_vllms_shape(qwen_tokenizer):
    from qwenvl_pd.messages import PromptLogprobs
    from qwenvl_pd.proxy.prompt.detokenizer import TokenTable
    from qwenvl_pd.proxy.prompt.prompt_logprobs import echo_entries, ranked

    tokens = TokenTable(qwen_tokenizer)
    hi, there, sky = (qwen_tokenizer.encode(w)[0] for w in ("Hi", " there", " sky"))
    # " there" after "Hi": third best; " sky" after " there": the best, so listed once
    lp = PromptLogprobs(2, (-1.5, -0.25), (3, 1), (sky, hi, sky, there), (-0.5, -1.0, -0.25, -2.0))
    entries = ranked([hi, there, sky], lp, tokens)
    echo = echo_entries([hi, there, sky], entries, 1, tokens)
    out = completion("cmpl-1", "m", [Choice(0, "Hi there sky!", "length",
                                            echo + (TokenLogprob("!", -0.75, (33,), ()),),
                                            prompt_logprobs=entries)], usage(3, 1), created=7)
    choice = out["choices"][0]
    assert choice["prompt_logprobs"] == [None, {
        str(there): {"logprob": -1.5, "rank": 3, "decoded_token": " there"},
        str(sky): {"logprob": -0.5, "rank": 1, "decoded_token": " sky"},
        str(hi): {"logprob": -1.0, "rank": 2, "decoded_token": "Hi"}}, {
        str(sky): {"logprob": -0.25, "rank": 1, "decoded_token": " sky"},
        str(there): {"logprob": -2.0, "rank": 2, "decoded_token": " there"}}]
    # logprobs: 1 -> each prompt token itself and at most one more, the first one unscored
    assert choice["logprobs"] == {
        "tokens": ["Hi", " there", " sky", "!"], "token_logprobs": [None, -1.5, -0.25, -0.75],
        "top_logprobs": [None, {" there": -1.5, " sky": -0.5}, {" sky": -0.25, " there": -2.0},
                         {"!": -0.75}], "text_offset": [0, 2, 8, 12]}
    with pytest.raises(APIError, match="prompt logprobs for 2 positions of a 2-token prompt"):
        ranked([hi, there], lp, tokens)

"""/openapi.json describes the request bodies; vLLM's fields we do not honour are refused by name;
and a schemathesis fuzzer drives the live app from that schema without a single 5xx."""
from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwenvl_pd.proxy.vllm_fields import CHAT_REFUSED, COMPLETION_REFUSED, GENERATE_REFUSED
from test_app import ANSWER, chat, info, make_client, one_tokenizer  # noqa: F401 (fixtures)

BODIES = {"/v1/chat/completions": "ChatCompletionRequest", "/v1/completions": "CompletionRequest",
          "/generate": "GenerateRequest"}


@pytest.fixture(scope="module")
def live(info, qwen_tokenizer):  # noqa: F811
    # media fetches fail fast: the fuzzer writes http URLs of hosts that do not exist
    c, backend = make_client(info, qwen_tokenizer.encode(ANSWER), media_timeout_s=0.5)
    with c:
        yield c, backend


def test_openapi_describes_each_route_with_its_body(live):
    c, _ = live
    schema = c.get("/openapi.json").json()
    for path, model in BODIES.items():
        op = schema["paths"][path]["post"]
        assert op["requestBody"]["content"]["application/json"]["schema"] == {
            "$ref": f"#/components/schemas/{model}"}
        assert op["responses"]["400"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorResponse"}
    chat_props = schema["components"]["schemas"]["ChatCompletionRequest"]
    assert chat_props["required"] == ["messages"]
    assert chat_props["properties"]["n"]["anyOf"][0] == {"maximum": 128, "minimum": 1, "type": "integer"}
    assert not set(chat_props["properties"]) & set(CHAT_REFUSED)
    assert c.get("/docs").status_code == 200


REFUSED_VALUES = {"bad_words": ["x"], "length_penalty": 0.5, "include_reasoning": False,
                  "priority": 1, "best_of": 2, "routed_experts_prompt_start": 3}


def _refused(route: str, names: tuple[str, ...], base: dict):
    return [(route, name, base) for name in names]


@pytest.mark.parametrize("route, name, base", [
    *_refused("/v1/chat/completions", CHAT_REFUSED, chat()),
    *_refused("/v1/completions", COMPLETION_REFUSED, {"prompt": "hi"}),
    *_refused("/generate", GENERATE_REFUSED, {"prompt": "hi"}),
])
def test_fields_not_honoured_are_refused_by_name(live, route, name, base):
    c, backend = live
    before = len(backend.requests)
    r = c.post(route, json={**base, name: REFUSED_VALUES.get(name, True)})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == name
    assert r.json()["error"]["message"] == f"'{name}' is not supported by this server"
    assert len(backend.requests) == before


def test_default_values_of_refused_fields_are_accepted(live):
    c, _ = live
    defaults = {"best_of": 1, "length_penalty": 1.0,
                "include_reasoning": True, "priority": 0, "echo": False,
                "bad_words": [], "prompt_logprobs": None}
    assert c.post("/v1/chat/completions", json=chat(max_tokens=2, **defaults)).status_code == 200


def _operations(client) -> list:
    schema = schemathesis.openapi.from_dict(client.get("/openapi.json").json())
    return [schema[path]["POST"] for path in BODIES]


@pytest.mark.timeout(120)
def test_fuzzed_bodies_never_get_a_server_error(live):
    c, backend = live
    cases = st.one_of(*(op.as_strategy() for op in _operations(c)))
    seen = []

    @settings(max_examples=300, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(cases)
    def run(case):
        r = c.request(case.method, case.formatted_path, json=case.body)
        seen.append(r.status_code)
        assert r.status_code < 500, (case.formatted_path, case.body, r.text)
    run()
    # the schema's bodies are mostly valid: a fuzzer that only ever hit 400s would test little
    assert seen.count(200) >= len(seen) // 8, seen

"""OpenAI's response_format and vLLM's structured_outputs (and its older guided_* fields) ->
one StructuredOutputsParams, compiled once here so that a bad grammar is a 400 before anything is
scheduled."""
from __future__ import annotations

import json
from typing import Any

from qwenvl_pd.grammar import grammar_error
from qwenvl_pd.proxy.errors import bad_request
from qwenvl_pd.sampling_params import StructuredOutputsParams

__all__ = ["parse_structured", "checked"]

KINDS = ("json", "regex", "choice", "grammar", "json_object")
# vLLM's structured_outputs fields we accept without their changing anything here: whitespace is
# always compact (grammar.py), and a grammar that fails is a 400, never a fallback
HARMLESS = ("disable_fallback", "disable_any_whitespace")
GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
          "guided_grammar": "grammar"}


def parse_structured(body: dict) -> StructuredOutputsParams | None:
    """The request's grammar, or None; raises a 400 naming the field."""
    found = [f for f in (_response_format(body.get("response_format")),
                         _vllm(body.get("structured_outputs")), *_guided(body)) if f is not None]
    if len(found) > 1:
        first, second = (param.split(".")[0] for param, _ in found[:2])
        raise bad_request(f"'{first}' and '{second}' both constrain the output; send one", second)
    return checked(*found[0]) if found else None


def checked(param: str, spec: StructuredOutputsParams) -> StructuredOutputsParams:
    """spec, once it compiles; else a 400 with llguidance's reason."""
    error = grammar_error(spec)
    if error:
        raise bad_request(f"'{param}' does not compile: {error}", param)
    return spec


Found = tuple[str, StructuredOutputsParams]  # (the field it came from, the spec)


def _response_format(v: Any) -> Found | None:
    if v is None:
        return None
    kind = v.get("type") if isinstance(v, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return "response_format", StructuredOutputsParams(json_object=True)
    if kind != "json_schema":
        raise bad_request(f"'response_format.type' must be 'text', 'json_object' or 'json_schema', "
                          f"got {kind!r}", "response_format.type")
    inner = v.get("json_schema")
    schema = inner.get("schema") if isinstance(inner, dict) else None
    if not isinstance(schema, (dict, bool)):
        raise bad_request("'response_format.json_schema.schema' must be a JSON schema object",
                          "response_format.json_schema.schema")
    return "response_format", StructuredOutputsParams(json=json.dumps(schema))


def _vllm(v: Any) -> Found | None:
    if v is None:
        return None
    if not isinstance(v, dict):
        raise bad_request("'structured_outputs' must be an object", "structured_outputs")
    for key, value in v.items():
        if key not in KINDS + HARMLESS and value not in (None, False, "", []):
            raise bad_request(f"'structured_outputs.{key}' is not supported by this server",
                              f"structured_outputs.{key}")
    set_ = [k for k in KINDS if v.get(k) not in (None, False, "", [])]
    if len(set_) != 1:
        raise bad_request(f"'structured_outputs' needs exactly one of {KINDS}, got {set_}",
                          "structured_outputs")
    param = f"structured_outputs.{set_[0]}"
    return param, _spec(set_[0], v[set_[0]], param)


def _guided(body: dict) -> list[Found]:
    return [(key, _spec(kind, body[key], key)) for key, kind in GUIDED.items()
            if body.get(key) not in (None, "", [])]


def _spec(kind: str, value: Any, param: str) -> StructuredOutputsParams:
    if kind == "json":
        if isinstance(value, str):  # vLLM takes the schema as an object or as its JSON text
            try:
                value = json.loads(value)
            except ValueError as e:
                raise bad_request(f"'{param}' is not valid JSON: {e}", param) from None
        if not isinstance(value, (dict, bool)):
            raise bad_request(f"'{param}' must be a JSON schema object", param)
        return StructuredOutputsParams(json=json.dumps(value))
    if kind == "json_object":
        if value is not True:
            raise bad_request(f"'{param}' must be true", param)
        return StructuredOutputsParams(json_object=True)
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
            raise bad_request(f"'{param}' must be a non-empty list of non-empty strings", param)
        return StructuredOutputsParams(choice=tuple(value))
    if not isinstance(value, str):
        raise bad_request(f"'{param}' must be a string", param)
    return StructuredOutputsParams(**{kind: value})

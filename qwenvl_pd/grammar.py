"""Structured-output specs -> llguidance grammars; shared by the proxy (which refuses a grammar
that does not compile before anything is scheduled) and the engine (which matches it).

Neither side needs the tokenizer to validate: llguidance checks the grammar itself, and the
nodes check it again (with their tokenizer) before a request reaches the engine."""
from __future__ import annotations

import json

import llguidance as llg

from qwenvl_pd.sampling_params import StructuredOutputsParams

MAX_GRAMMAR_CHARS = 64 * 1024  # a schema, regex or grammar: llguidance builds it per request
# OpenAI's JSON mode asks for an object (vLLM's json_object too), not any JSON value
_JSON_OBJECT_SCHEMA = {"type": "object"}
# Whitespace between JSON tokens is fixed (", " and ": " as json.dumps writes them), not free:
# a free one lets a model (a random-weight one always) pad forever and never close the object.
_COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def grammar_text(spec: StructuredOutputsParams) -> str:
    """The llguidance grammar (its JSON form) for one spec."""
    if spec.json is not None or spec.json_object:
        schema = json.loads(spec.json) if spec.json is not None else _JSON_OBJECT_SCHEMA
        if isinstance(schema, dict) and "x-guidance" not in schema:
            schema = {**schema, "x-guidance": _COMPACT}
        return llg.grammar_from("json_schema", json.dumps(schema))
    if spec.regex is not None:
        return llg.grammar_from("regex", spec.regex)
    if spec.choice:
        return llg.grammar_from("choice", json.dumps(list(spec.choice)))
    # "grammar" takes Lark or GBNF (llama.cpp's ::= form, which vLLM's xgrammar also takes)
    return llg.grammar_from("grammar", spec.grammar)


def grammar_error(spec: StructuredOutputsParams, tokenizer=None) -> str:
    """"" when the spec compiles, else why not (a message for the client)."""
    size = sum(len(s or "") for s in (spec.json, spec.regex, spec.grammar)) + sum(map(len, spec.choice))
    if size > MAX_GRAMMAR_CHARS:
        return f"the grammar is {size} characters; at most {MAX_GRAMMAR_CHARS} are allowed"
    try:
        return llg.LLMatcher.validate_grammar(grammar_text(spec), tokenizer)
    except Exception as e:  # noqa: BLE001 - llguidance raises several kinds on malformed input
        return str(e) or type(e).__name__

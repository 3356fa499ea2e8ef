"""The request bodies as pydantic models: what /openapi.json describes.

They mirror the rules protocol.py enforces (types, bounds, which fields exist), but requests are
still validated by protocol.py, not by these models: its errors name the exact field in OpenAI's
400 body, where FastAPI's body parsing would answer 422 in its own words. Unknown fields are
allowed, as protocol.py ignores them; vLLM's fields this server refuses (vllm_fields.py) are
left out of the schema.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from qwenvl_pd.proxy.protocol import (INT64, MAX_LOGPROBS, MAX_N, MAX_PROMPTS, MAX_STOP, MAX_STOP_TOKEN_IDS,
                                      ROLES)

__all__ = ["ChatCompletionRequest", "CompletionRequest", "GenerateRequest", "ErrorResponse",
           "request_body", "component_schemas"]

NonNegative = Annotated[int, Field(ge=0)]
# vLLM's extra: alternatives per prompt position, besides the prompt's own token; not with stream
PromptLogprobs = Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None
Stop = Union[Annotated[str, Field(min_length=1)],
             Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOP)]]


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")  # SDKs send fields of their own; they are ignored


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class URL(_Open):
    url: Annotated[str, Field(min_length=1)]
    detail: str | None = None


class TextPart(_Open):
    type: Literal["text"]
    text: str | None = None


class ImagePart(_Open):
    type: Literal["image_url"]
    image_url: URL | Annotated[str, Field(min_length=1)]  # a bare URL is a common shorthand


class VideoPart(_Open):
    type: Literal["video_url"]
    video_url: URL | Annotated[str, Field(min_length=1)]


Part = Annotated[Union[TextPart, ImagePart, VideoPart], Field(discriminator="type")]


class FunctionCall(_Open):
    name: str
    arguments: str = "{}"  # JSON text


class ToolCall(_Open):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Open):
    role: Literal[ROLES]
    content: str | list[Part] | None = None  # None only for an assistant turn
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class FunctionDefinition(_Open):
    name: Annotated[str, Field(min_length=1)]
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Open):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Open):
    name: str


class NamedToolChoice(_Open):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Open):
    name: str | None = None
    schema_: dict[str, Any] | bool = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(_Open):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None  # required when type is json_schema


class StructuredOutputs(_Closed):
    """vLLM's structured_outputs: exactly one of the grammar kinds."""
    json_: dict[str, Any] | bool | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[Annotated[str, Field(min_length=1)]] | None = Field(None, min_length=1)
    grammar: str | None = None
    json_object: Literal[True] | None = None
    disable_fallback: bool | None = None
    disable_any_whitespace: bool | None = None


class StreamOptions(_Open):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None  # vLLM's: with include_usage, usage on every chunk


class _Sampling(_Open):
    """The fields every route shares (protocol.request_common)."""
    model: str | None = None
    stream: bool | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] | None = None
    temperature: Annotated[float, Field(ge=0)] | None = None
    do_sample: bool | None = None  # MindIE's switch: false is greedy
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    seed: Annotated[int, Field(ge=INT64[0], le=INT64[1])] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    min_tokens: NonNegative | None = None  # at most max_tokens
    stop: Stop | None = None
    stop_token_ids: Annotated[list[NonNegative], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    ignore_eos: bool | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    logit_bias: dict[str, float] | None = None  # token id -> bias, clamped to [-100, 100]
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | bool | str | None = None
    guided_regex: str | None = None
    guided_choice: list[Annotated[str, Field(min_length=1)]] | None = None
    guided_grammar: str | None = None


class _Streamed(_Sampling):
    stream_options: StreamOptions | None = None  # only with stream: true


class ChatCompletionRequest(_Streamed):
    messages: Annotated[list[Message], Field(min_length=1)]
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None  # needs logprobs
    add_generation_prompt: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    prompt_logprobs: PromptLogprobs = None  # on the response


TokenIds = Annotated[list[NonNegative], Field(min_length=1)]


class CompletionRequest(_Streamed):
    # one prompt, a string or token ids, or a batch of them (choices numbered prompt by prompt)
    prompt: Union[Annotated[str, Field(min_length=1)], TokenIds,
                  Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=MAX_PROMPTS)],
                  Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]]
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool | None = None  # with logprobs: the prompt's entries first (its first one null)
    prompt_logprobs: PromptLogprobs = None  # on each choice


class GenerateRequest(_Sampling):
    """MindIE's /generate: a string prompt, or content parts for one user turn."""
    prompt: Union[Annotated[str, Field(min_length=1)], Annotated[list[Part], Field(min_length=1)]]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


MODELS = (ChatCompletionRequest, CompletionRequest, GenerateRequest, ErrorResponse)
REF = "#/components/schemas/{model}"


def request_body(model: type[BaseModel]) -> dict[str, Any]:
    """A route's openapi_extra: its JSON body is `model` (a component of component_schemas())."""
    schema = {"$ref": REF.format(model=model.__name__)}
    errors = {"description": "OpenAI's error body; `param` names the bad field",
              "content": {"application/json": {"schema": {"$ref": REF.format(model="ErrorResponse")}}}}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
            "responses": {"400": errors}}


def component_schemas() -> dict[str, Any]:
    """Every model's JSON schema, named as request_body() refers to them."""
    _, top = models_json_schema([(m, "validation") for m in MODELS], ref_template=REF)
    return top["$defs"]

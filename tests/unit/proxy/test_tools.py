"""Tool calling without a model: tools/tool_choice parsing, the grammars required and named use,
the Hermes parser and the prompt for a template that renders no tools."""
import json

import pytest

from qwenvl_pd.proxy.errors import APIError
from qwenvl_pd.proxy.protocol import ChatMessage
from qwenvl_pd.proxy.prompt.templating import hermes_messages
from qwenvl_pd.proxy.tools import ToolCall, Tools, held_back, parse_output, parse_tools

F = {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}
TOOLS = [{"type": "function", "function": F}, {"type": "function", "function": {"name": "g"}}]


def test_named_choice_constrains_to_that_functions_parameters():
    t = parse_tools({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "f"}}})
    assert (t.mode, t.name) == ("named", "f")
    assert json.loads(t.grammar().json) == F["parameters"]
    assert parse_output(t, '{"x": 3}') == (None, (ToolCall("f", '{"x": 3}'),))


def test_required_is_an_array_of_known_calls():
    t = parse_tools({"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False})
    schema = json.loads(t.grammar().json)
    assert (schema["minItems"], schema["maxItems"]) == (1, 1)
    assert [i["properties"]["name"] for i in schema["items"]["anyOf"]] == [{"const": "f"}, {"const": "g"}]
    assert parse_output(t, '[{"name": "g", "parameters": {}}]') == (None, (ToolCall("g", "{}"),))


def test_auto_parses_hermes_calls_and_keeps_the_text_before_them():
    t = parse_tools({"tools": TOOLS})
    text = 'Let me look.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'
    assert parse_output(t, text) == ("Let me look.", (ToolCall("f", '{"x": 1}'),))
    assert parse_output(t, "<tool_call>\nnot json\n</tool_call>") == ("<tool_call>\nnot json\n</tool_call>", ())
    assert parse_output(parse_tools({"tools": TOOLS, "tool_choice": "none"}), text) == (text, ())
    assert (held_back("ok <tool"), held_back("ok"), held_back("a<")) == (5, 0, 1)


@pytest.mark.parametrize("body, param", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "h"}}},
     "tool_choice.function.name"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]},
     "tools[0].function.parameters"),
    ({"tools": TOOLS, "parallel_tool_calls": "no"}, "parallel_tool_calls"),
])
def test_bad_tools_are_400s_naming_the_field(body, param):
    with pytest.raises(APIError) as e:
        parse_tools(body)
    assert (e.value.status, e.value.param) == (400, param)


def test_templates_without_tools_get_qwens_tool_prompt_calls_and_responses():
    msgs = [ChatMessage("user", "hi"), ChatMessage("assistant", "", (ToolCall("f", '{"x": 1}', "c1"),)),
            ChatMessage("tool", '{"y": 2}', tool_call_id="c1")]
    out = hermes_messages(msgs, parse_tools({"tools": TOOLS}))
    assert out[0].role == "system" and out[0].content.startswith("# Tools\n\nYou may call one or more")
    assert '{"type": "function", "function": {"name": "g"}}' in out[0].content
    assert out[2] == ChatMessage("assistant", '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>')
    assert out[3] == ChatMessage("user", '<tool_response>\n{"y": 2}\n</tool_response>')

"""Tool calls streamed as vLLM's hermes parser streams them: the same calls and content whether
the text arrives whole or a character at a time, the name before the arguments, no content after
a call has started."""
import pytest

from qwenvl_pd.proxy.tool_stream import CallEvent, tool_stream
from qwenvl_pd.proxy.tools import parse_tools

TOOLS = [{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "g"}}]
TWO_CALLS = ('Let me look.\n<tool_call>\n{"name": "f", "arguments": {"x": {"y": [1, "}"]}}}\n</tool_call>\n'
             '<tool_call>\n{"arguments": {}, "name": "g"}\n</tool_call>')
CASES = {  # text -> (content, [(name, arguments)]) with parallel calls
    "two calls, the second in another key order": (TWO_CALLS, "Let me look.", [
        ("f", '{"x": {"y": [1, "}"]}}'), ("g", "{}")]),
    "no call": ("plain text  \n", "plain text  \n", []),
    "not json: all content": ("<tool_call>\nnot json\n</tool_call> after",
                              "<tool_call>\nnot json\n</tool_call> after", []),
    "arguments as a string": ('A <tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>', "A",
                              [("f", '{"a": 1}')]),
    "cut off by max_tokens": ('x <tool_call>{"name": "f", "arguments": {"a": 1', "x", [("f", '{"a": 1')]),
    "text between calls is no content": (
        '<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call> and <tool_call>{"name": "g", '
        '"arguments": {}}</tool_call>', "", [("f", '{"a": 1}'), ("g", "{}")]),
}


def _run(tools, pieces):
    ts, content, events = tool_stream(tools), [], []
    for k, piece in enumerate(pieces):
        c, e = ts.feed(piece, final=k == len(pieces) - 1)
        content.append(c)
        events += e
    return "".join(content), [(c.name, c.arguments) for c in ts.calls()], events


@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("case", list(CASES))
def test_whole_and_character_by_character_give_the_same_message(case, parallel):
    text, content, calls = CASES[case]
    tools = parse_tools({"tools": TOOLS, "parallel_tool_calls": parallel})
    whole = _run(tools, [text])[:2]
    streamed = _run(tools, [*text, ""])[:2]
    assert whole == streamed == (content, calls if parallel else calls[:1])


def test_the_name_goes_first_then_fragments_as_written():
    tools = parse_tools({"tools": TOOLS})
    text = 'Sure. <tool_call>\n{"name": "f", "arguments": {"city": "Paris"}}\n</tool_call>'
    ts = tool_stream(tools)
    seen = [ts.feed(piece) for piece in ["Sure. <tool", '_call>\n{"name": "f", "arg', 'uments": {"ci',
                                         'ty": "Par', 'is"}}', "\n</tool_call>"]]
    assert [c for c, _ in seen] == ["Sure.", "", "", "", "", ""]
    events = [e for _, evs in seen for e in evs]
    assert events[0].name == "f" and events[0].id.startswith("call_") and events[0].arguments == ""
    assert [e.arguments for e in events[1:]] == ['{"ci', 'ty": "Par', 'is"}']
    assert ts.calls()[0].arguments == '{"city": "Paris"}' and text  # held: '}}' might close it all


def test_named_choice_streams_the_text_as_the_arguments():
    tools = parse_tools({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "g"}}})
    ts = tool_stream(tools)
    first, second = ts.feed('{"a"'), ts.feed(": 2}", final=True)
    assert [(e.name, e.arguments) for e in first[1]] == [("g", ""), (None, '{"a"')]
    assert second == ("", [CallEvent(0, ": 2}")])
    assert [(c.name, c.arguments) for c in ts.calls()] == [("g", '{"a": 2}')]

"""Tool calling on its own (no server): the Hermes parser, streamed against parsed whole, the default chat
template's tool layout against a hand-written prompt, and the checks on `tools` / `tool_choice`."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from step3vl.processor.chat import render_chat
from step3vl.serve.protocol import RequestError, tool_plan
from step3vl.serve.tool_calls import ToolCallStream, ToolDeltas, parse_tool_calls

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather <now> & later",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}


def _call(name: str, args: dict) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": args}) + "\n</tool_call>"


def _names_args(calls: list[dict]) -> list[tuple[str, dict]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def test_parse_plain_text_and_calls():
    assert parse_tool_calls("no calls here") == ("no calls here", [])
    content, calls = parse_tool_calls("Let me look.\n" + _call("get_weather", {"city": "Paris"}))
    assert content == "Let me look.\n" and _names_args(calls) == [("get_weather", {"city": "Paris"})]
    assert calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")
    # STEP3-VL's wrapper around several calls; arguments given as a JSON string are passed through
    text = ("<tool_calls>\n" + _call("get_weather", {"city": "Rome"}) + "\n"
            + '<tool_call>\n{"name": "get_time", "arguments": "{\\"tz\\": \\"UTC\\"}"}\n</tool_call>\n</tool_calls>')
    content, calls = parse_tool_calls(text)
    assert content == "" and _names_args(calls) == [("get_weather", {"city": "Rome"}), ("get_time", {"tz": "UTC"})]


def test_malformed_blocks_stay_content():
    bad = "<tool_call>\n{not json}\n</tool_call>"
    content, calls = parse_tool_calls("a " + bad + " b " + _call("get_time", {}))
    assert _names_args(calls) == [("get_time", {})]
    assert content == "a " + bad + " b "
    unclosed = "x <tool_call>\n{\"name\": \"get_time\""
    assert parse_tool_calls(unclosed) == (unclosed, [])
    assert parse_tool_calls("<tool_call>[1, 2]</tool_call>") == ("<tool_call>[1, 2]</tool_call>", [])


_PIECES = st.one_of(
    st.text(alphabet="ab <>/_\n{}\"", max_size=12),
    st.sampled_from(["<tool_call>", "</tool_call>", "<tool_calls>", "</tool_calls>", "<tool_ca", "<tool",
                     "<tool_call>{oops}</tool_call>"]),
    st.builds(lambda c, n: _call("f" + str(n), {"city": c}), st.text(alphabet="xy<>", max_size=4), st.integers(0, 9)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_PIECES, max_size=8), st.data())
def test_stream_equals_whole_parse_for_any_split(pieces, data):
    """Fed in any chunks, the stream's content deltas join to the whole parse's content and its calls are the same
    calls in the same order; every call goes out once, as soon as its block closes."""
    text = "".join(pieces)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=6)))
    stream, content, calls = ToolCallStream(), "", []
    for end in cuts + [len(text)]:
        delta, new = stream.feed(text[:end], finished=False)
        content, calls = content + delta, calls + new
        assert len(calls) <= text[:end].count("</tool_call>")
    delta, new = stream.feed(text, finished=True)
    content, calls = content + delta, calls + new
    want_content, want_calls = parse_tool_calls(text)
    assert content == want_content
    assert _names_args(calls) == _names_args(want_calls)


def test_named_and_required_deltas():
    named = tool_plan([WEATHER, TIME], {"type": "function", "function": {"name": "get_weather"}})
    d = ToolDeltas(named)
    first = d.delta("", False)
    assert first[0] == "" and first[1][0]["function"] == {"name": "get_weather", "arguments": ""}
    assert d.delta('{"city": ', False) == ("", [{"index": 0, "function": {"arguments": '{"city": '}}])
    assert d.delta('"Oslo"}', True)[1][0]["function"]["arguments"] == '"Oslo"}'
    required = tool_plan([WEATHER, TIME], "required")
    d = ToolDeltas(required)
    assert d.delta('[{"name": "get_time", "parameters": {}}', False) == ("", [])
    content, calls = d.delta("]", True)
    assert content == "" and [(c["index"], c["function"]["name"]) for c in calls] == [(0, "get_time")] and d.called
    cut = ToolDeltas(required)  # cut by max_tokens: the text comes back as content
    assert cut.delta('[{"name": "get_ti', True) == ('[{"name": "get_ti', []) and not cut.called


def test_required_and_named_schemas():
    named = tool_plan([WEATHER], {"type": "function", "function": {"name": "get_weather"}}).structured()
    assert named == {"json": WEATHER["function"]["parameters"]}
    required = tool_plan([WEATHER, TIME], "required").structured()["json"]
    assert required["minItems"] == 1
    assert [o["properties"]["name"]["enum"] for o in required["items"]["anyOf"]] == [["get_weather"], ["get_time"]]
    assert tool_plan([WEATHER], "auto").structured() is None and tool_plan([WEATHER], "none").structured() is None


def test_required_schema_hoists_defs():
    """Nested models (pydantic's $defs) keep resolving once the functions sit inside the "required" array
    schema; a clash between two functions' definitions is a 400 on tools. The schema compiles in xgrammar."""
    city = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    nested = {"type": "function", "function": {"name": "visit", "parameters": {
        "type": "object", "properties": {"city": {"$ref": "#/$defs/City"}}, "required": ["city"],
        "$defs": {"City": city}}}}
    schema = tool_plan([nested, TIME], "required").structured()["json"]
    assert schema["$defs"] == {"City": city} and "$defs" not in schema["items"]["anyOf"][0]["properties"]["parameters"]
    import xgrammar

    xgrammar.Grammar.from_json_schema(json.dumps(schema))  # resolves #/$defs/City from the root
    clash = {"type": "function", "function": {"name": "move", "parameters": {
        "type": "object", "properties": {"to": {"$ref": "#/$defs/City"}}, "$defs": {"City": {"type": "string"}}}}}
    with pytest.raises(RequestError) as e:
        tool_plan([nested, clash], "required")
    assert e.value.param == "tools"


def test_null_arguments_are_an_empty_object():
    _, calls = parse_tool_calls('<tool_call>{"name": "get_time", "arguments": null}</tool_call>')
    assert calls[0]["function"]["arguments"] == "{}"


@pytest.mark.parametrize("tools, choice, param", [
    ([WEATHER], {"type": "function", "function": "get_weather"}, "tool_choice"),
    ([WEATHER], {"type": "function", "function": ["get_weather"]}, "tool_choice"),
    (None, "required", "tool_choice"),
    ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "tool_choice"),
    ([WEATHER], "sometimes", "tool_choice"),
    ([{"type": "retrieval"}], None, "tools"),
    ([{"type": "function", "function": {"description": "no name"}}], None, "tools"),
    ([{"type": "function", "function": {"name": "f", "parameters": "x"}}], None, "tools"),
    ([WEATHER, WEATHER], None, "tools"),
])
def test_bad_tools_name_the_field(tools, choice, param):
    with pytest.raises(RequestError) as e:
        tool_plan(tools, choice)
    assert e.value.param == param


def test_default_template_lays_out_tools_calls_and_results():
    """Hand-written: the system turn carries the signatures, the assistant's calls are <tool_call> blocks (arguments
    given as a string or an object), and consecutive tool results share one user turn."""
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "22C"},
        {"role": "tool", "tool_call_id": "c2", "content": "25C"},
    ]
    signature = ('{"type": "function", "function": {"name": "get_weather", "description": "Weather <now> & later", '
                 '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}')
    want = ("<|im_start|>system\nBe brief.\n\n# Tools\n\nYou may call one or more functions to help with the user "
            "query.\n\nThe function signatures are within <tools></tools> XML tags:\n<tools>\n" + signature +
            "\n</tools>\n\nFor each function call, return a JSON object with the function name and arguments within "
            "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
            "<args-json-object>}\n</tool_call><|im_end|>\n"
            "<|im_start|>user\nWeather in Paris and Rome?<|im_end|>\n"
            "<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n"
            "</tool_call>\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}\n"
            "</tool_call><|im_end|>\n"
            "<|im_start|>user\n<tool_response>\n22C\n</tool_response>\n<tool_response>\n25C\n</tool_response>"
            "<|im_end|>\n<|im_start|>assistant\n")
    assert render_chat(messages, None, True, tools=[WEATHER]) == want
    # without tools the system turn is an ordinary one
    assert render_chat(messages[:2], None, False) == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                                                      "<|im_start|>user\nWeather in Paris and Rome?<|im_end|>\n")

"""Tool calling through `step3vl serve` and the official `openai` client, over real HTTP.

The tiny checkpoint's weights are random, so the answers are scripted: a logits processor makes the model write a
given text token by token and then end. What is tested is everything around the model: the tools reach the
prompt through the chat template, the answer's <tool_call> blocks come back as `tool_calls` (whole and streamed
alike), the conversation continues with the tool results, "required" and named tool choices are forced by
structured outputs, and bad tools are 400s naming the field."""

from __future__ import annotations

import json

import openai
import pytest

MODEL = "tiny"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
                   "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def _streamed(client, **kw) -> tuple[str, str, dict[int, dict], str]:
    """(reasoning, content, calls by index, finish_reason) accumulated from a stream the way clients do."""
    reasoning, content, calls, finish = "", "", {}, None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            d = ch.delta
            reasoning += getattr(d, "reasoning_content", None) or ""
            content += d.content or ""
            for tc in d.tool_calls or []:
                slot = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
                slot["id"] = tc.id or slot["id"]
                if tc.function:
                    slot["name"] = tc.function.name or slot["name"]
                    slot["arguments"] += tc.function.arguments or ""
            finish = ch.finish_reason or finish
    return reasoning, content, calls, finish


def test_auto_tool_calls_whole_and_streamed(scripted):
    client, script, _ = scripted
    script.say("Let me check.\n" + CALL)
    r = client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER, TIME], max_tokens=200)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls"
    assert c.message.content == "Let me check.\n"
    (tc,) = c.message.tool_calls
    assert tc.type == "function" and tc.id.startswith("call_")
    assert tc.function.name == "get_weather" and json.loads(tc.function.arguments) == {"city": "Paris"}

    _, content, calls, finish = _streamed(client, model=MODEL, messages=USER, tools=[WEATHER, TIME], max_tokens=200)
    assert (content, finish) == ("Let me check.\n", "tool_calls")
    assert [(v["name"], json.loads(v["arguments"])) for v in calls.values()] == [("get_weather", {"city": "Paris"})]
    assert calls[0]["id"].startswith("call_")


def test_whitespace_before_a_call_is_content_streamed_and_whole(scripted):
    """A thinking model's answer often starts with blank lines before its call: the stream has sent them as
    content, so the whole response keeps them too (vLLM's behaviour)."""
    client, script, _ = scripted
    script.say("\n\n" + CALL)
    c = client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER], max_tokens=200).choices[0]
    _, content, calls, _ = _streamed(client, model=MODEL, messages=USER, tools=[WEATHER], max_tokens=200)
    assert c.message.content == content == "\n\n" and len(c.message.tool_calls) == len(calls) == 1


def test_two_calls_in_the_wrapper(scripted):
    client, script, _ = scripted
    script.say("<tool_calls>\n" + CALL + '\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n'
               "</tool_call>\n</tool_calls>")
    r = client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER, TIME], max_tokens=200)
    c = r.choices[0]
    assert c.message.content is None and c.finish_reason == "tool_calls"
    assert [(t.function.name, json.loads(t.function.arguments)) for t in c.message.tool_calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {"zone": "UTC"})]
    assert len({t.id for t in c.message.tool_calls}) == 2
    _, content, calls, _ = _streamed(client, model=MODEL, messages=USER, tools=[WEATHER, TIME], max_tokens=200)
    assert content == "" and [v["name"] for _, v in sorted(calls.items())] == ["get_weather", "get_time"]


def test_no_tools_or_tool_choice_none_return_the_text(scripted):
    client, script, _ = scripted
    script.say(CALL)
    for kw in ({}, {"tools": [WEATHER], "tool_choice": "none"}):
        c = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=200, **kw).choices[0]
        assert c.message.content == CALL and not c.message.tool_calls and c.finish_reason == "stop"


def test_the_conversation_goes_on_with_the_tool_result(scripted):
    """The follow-up turn carries the assistant's call and the tool's result; its prompt is the template's
    rendering with the tools (checked through /tokenize's count), and the model answers in plain text."""
    client, script, srv = scripted
    script.say("It is 22C in Paris.")
    messages = USER + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "22C, sunny"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], max_tokens=200)
    assert r.choices[0].message.content == "It is 22C in Paris." and r.choices[0].finish_reason == "stop"
    text, _ = srv.llm.processor.apply_chat_template(messages, tools=[WEATHER])
    assert "<tool_response>\n22C, sunny\n</tool_response>" in text and '"name": "get_weather"' in text
    assert r.usage.prompt_tokens == len(srv.llm.prepare(text).token_ids)


def test_named_tool_choice_is_forced(free):
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = free.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER, TIME], tool_choice=named, n=4,
                                     seed=3, max_tokens=120)
    done = [c for c in r.choices if c.finish_reason == "stop"]
    assert len(done) >= 2
    for c in done:
        (tc,) = c.message.tool_calls
        assert c.message.content is None and tc.function.name == "get_weather"
        assert json.loads(tc.function.arguments)["city"] in {"Paris", "Rome"}
    _, content, calls, finish = _streamed(free, model=MODEL, messages=USER, tools=[WEATHER, TIME],
                                          tool_choice=named, seed=3, max_tokens=120)
    assert content == "" and calls[0]["name"] == "get_weather"
    if finish == "stop":
        assert json.loads(calls[0]["arguments"])["city"] in {"Paris", "Rome"}


def test_required_tool_choice_is_forced(free):
    r = free.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER, TIME], tool_choice="required",
                                     n=4, seed=5, max_tokens=160)
    done = [c for c in r.choices if c.finish_reason == "tool_calls"]
    assert len(done) >= 2
    for c in done:
        assert c.message.content is None and c.message.tool_calls
        for tc in c.message.tool_calls:
            args = json.loads(tc.function.arguments)
            assert (tc.function.name, tuple(args)) in {("get_weather", ("city",)), ("get_time", ("zone",))}
    for c in r.choices:  # cut by max_tokens: no calls, the text comes back as content
        if c.finish_reason == "length":
            assert not c.message.tool_calls and c.message.content


def _error(fn) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as e:
        fn()
    return e.value


@pytest.mark.parametrize("kw, param", [
    (dict(tools=[{"type": "function", "function": {"description": "x"}}]), "tools"),
    (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
    (dict(tool_choice="required"), "tool_choice"),
    (dict(tools=[WEATHER], tool_choice="required", response_format={"type": "json_object"}), "tool_choice"),
])
def test_bad_tools_are_400s(scripted, kw, param):
    client, script, _ = scripted
    script.say("")
    err = _error(lambda: client.chat.completions.create(model=MODEL, messages=USER, max_tokens=4, **kw))
    assert err.status_code == 400 and err.body["param"] == param

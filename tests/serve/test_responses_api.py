"""OpenAI's Responses API through the official `openai` client over real HTTP: text and reasoning items against
the in-process reference, every body validated against the client's own pydantic models, the streamed events
ending in the non-streamed response, function calls continued with `previous_response_id`, instructions,
structured text, images, and errors that name the field."""

from __future__ import annotations

import base64
import io
import json

import httpx
import openai
import pytest
from openai.types.responses import Response
from PIL import Image

from step3vl import SamplingParams
from step3vl.serve.reasoning import split_reasoning

MODEL = "tiny"
WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
                          "required": ["city"], "additionalProperties": False}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def _post(client: openai.OpenAI, body: dict) -> httpx.Response:
    return httpx.post(str(client.base_url) + "responses", json=body, timeout=120)


def _events(client: openai.OpenAI, **kw) -> list:
    return list(client.responses.create(stream=True, **kw))


def test_free_text_matches_the_reference(client, reference):
    """Reasoning and answer of a seeded request equal the in-process LLM's, split at </think>; cut by
    max_output_tokens, the response is `incomplete` with that reason; the body is a valid `Response`."""
    messages = [{"role": "user", "content": "Name three colours."}]
    ref = reference.chat(messages, SamplingParams(seed=7, max_tokens=9), use_tqdm=False)[0]
    want = ref.outputs[0]
    thought, content = split_reasoning(want.text, finished=True)
    raw = _post(client, {"model": MODEL, "input": "Name three colours.", "max_output_tokens": 9, "seed": 7})
    r = Response.model_validate(raw.json())
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    reasoning = [i for i in r.output if i.type == "reasoning"]
    assert reasoning[0].content[0].text == thought
    assert r.output_text == content
    assert r.usage.output_tokens == 9 and r.usage.input_tokens == len(ref.prompt_token_ids)
    think = reference.get_tokenizer().think_end_id
    assert r.usage.output_tokens_details.reasoning_tokens == (
        want.token_ids.index(think) + 1 if think in want.token_ids else 9)


def test_stream_ends_in_the_non_streamed_response(scripted):
    client, script, _ = scripted
    script.say("Hello there, friend.")
    whole = client.responses.create(model=MODEL, input="Say hello.", max_output_tokens=100)
    assert whole.status == "completed" and whole.output_text == "Hello there, friend."
    events = _events(client, model=MODEL, input="Say hello.", max_output_tokens=100)
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == whole.output_text
    done = [e for e in events if e.type == "response.output_text.done"]
    assert done[0].text == whole.output_text
    final = events[-1].response
    assert final.output_text == whole.output_text and final.usage.output_tokens == whole.usage.output_tokens
    for e in events:  # every event is one of the client's own models, not an unknown payload
        assert type(e).__module__.startswith("openai.types.responses"), e


def test_function_call_then_previous_response(scripted):
    """The answer's call becomes a function_call item; the next request sends only its output and
    `previous_response_id`, and the prompt is the whole conversation rendered with the tools."""
    client, script, srv = scripted
    script.say(CALL)
    first = client.responses.create(model=MODEL, input="Weather in Paris?", tools=[WEATHER], max_output_tokens=200)
    calls = [i for i in first.output if i.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and json.loads(calls[0].arguments) == {"city": "Paris"}
    assert first.status == "completed" and not first.output_text

    streamed = _events(client, model=MODEL, input="Weather in Paris?", tools=[WEATHER], max_output_tokens=200)
    args = [e for e in streamed if e.type == "response.function_call_arguments.done"]
    assert len(args) == 1 and json.loads(args[0].arguments) == {"city": "Paris"}

    script.say("It is sunny.")
    second = client.responses.create(
        model=MODEL, previous_response_id=first.id, tools=[WEATHER], max_output_tokens=200,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "22C, sunny"}])
    assert second.output_text == "It is sunny." and second.previous_response_id == first.id
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": calls[0].call_id, "type": "function",
                                                                        "function": {"name": "get_weather",
                                                                                     "arguments": calls[0].arguments}}]},
                {"role": "tool", "tool_call_id": calls[0].call_id, "content": "22C, sunny"}]
    chat_tool = {"type": "function", "function": {k: WEATHER[k] for k in ("name", "description", "parameters")}}
    text, _ = srv.llm.processor.apply_chat_template(messages, tools=[chat_tool])
    assert second.usage.input_tokens == len(srv.llm.prepare(text).token_ids)
    assert client.responses.retrieve(second.id).output_text == "It is sunny."


def test_instructions_and_store_false(scripted):
    client, script, srv = scripted
    script.say("Yes.")
    r = client.responses.create(model=MODEL, instructions="Answer in one word.", input="Ready?", store=False,
                                max_output_tokens=50)
    text, _ = srv.llm.processor.apply_chat_template([{"role": "system", "content": "Answer in one word."},
                                                     {"role": "user", "content": "Ready?"}])
    assert r.usage.input_tokens == len(srv.llm.prepare(text).token_ids) and r.output_text == "Yes."
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)


def test_structured_text_format(free):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    outs = [free.responses.create(model=MODEL, input="Is it fine?", max_output_tokens=120, extra_body={"seed": s},
                                  text={"format": {"type": "json_schema", "name": "answer", "schema": schema}})
            for s in range(3)]
    done = [r for r in outs if r.status == "completed"]
    assert done
    for r in done:
        assert isinstance(json.loads(r.output_text)["ok"], bool)


def test_image_input(scripted):
    client, script, _ = scripted
    script.say("A red box.")
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    with_image = client.responses.create(model=MODEL, max_output_tokens=50, input=[{"role": "user", "content": [
        {"type": "input_image", "image_url": url}, {"type": "input_text", "text": "What is it?"}]}])
    text_only = client.responses.create(model=MODEL, max_output_tokens=50, input="What is it?")
    assert with_image.output_text == "A red box." and with_image.usage.input_tokens > text_only.usage.input_tokens + 8


@pytest.mark.parametrize("body, status, param", [
    ({"input": "x", "previous_response_id": "resp_nope"}, 404, "previous_response_id"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, 400, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, 400, "input"),
    ({"input": "x", "background": True}, 400, "background"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, 400, "tools"),
    ({"input": "x", "max_output_tokens": 100000}, 400, "max_tokens"),
])
def test_errors_name_the_field(client, body, status, param):
    r = _post(client, {"model": MODEL, **body})
    assert r.status_code == status and r.json()["error"]["param"] == param

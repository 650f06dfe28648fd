"""OpenAI's Responses API (`POST /v1/responses`, `GET /v1/responses/{id}`) as an adapter over chat completions.

A request's `input` (a string or a list of items: messages with input_text / input_image / output_text parts,
function_call and function_call_output items) and `instructions` become chat messages; `tools` (the Responses'
flat function shape), `tool_choice`, `text.format` (structured outputs), `max_output_tokens` and the sampling
fields become the chat request's. The chat handler of the named model runs it (so every served model works here,
PaCoRe's included), and its answer becomes output items: a `reasoning` item (the text before `</think>`), a
`message` with `output_text`, and one `function_call` item per tool call. Streaming turns the chat deltas into the
Responses event sequence (`response.created` … `response.output_text.delta` … `response.completed`), so the
stream always ends in the response a non-streamed request gets.

`previous_response_id` continues a stored conversation: responses are kept in memory (`store`, default true; the
newest `max_stored` of them) with the messages that led to them, as vLLM does without a database.
"""

from __future__ import annotations

import contextlib
import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict

from step3vl.serve.protocol import ChatCompletionRequest, RequestError, new_id, now
from step3vl.serve.streams import until_disconnected

_CHAT_FIELDS = set(ChatCompletionRequest.model_fields)


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # vLLM's sampling extras (top_k, seed, ...) pass on to the chat request

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None  # STEP3-VL always reasons; effort / summary are not settable
    previous_response_id: str | None = None
    store: bool = True
    metadata: dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    background: bool = False


@dataclass
class Stored:
    messages: list[dict]  # the conversation so far, this response's answer included
    response: dict


def input_messages(items: str | list[dict]) -> list[dict]:
    """Responses input → chat messages (consecutive function calls join one assistant turn)."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict] = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise RequestError(f"input[{i}] must be an object", "input")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise RequestError(f"input[{i}].role {role!r}: use user, system, developer or assistant", "input")
            messages.append({"role": "system" if role == "developer" else role,
                             "content": _content(i, item.get("content"))})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments", "{}")}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls"):
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": output if isinstance(output, str) else json.dumps(output)})
        elif kind == "reasoning":
            continue  # earlier reasoning is not shown to the model again (its chat template drops it too)
        else:
            raise RequestError(f"input[{i}].type {kind!r} is not supported (message, function_call, "
                               f"function_call_output, reasoning)", "input")
    return messages


def _content(i: int, content: Any) -> str | list[dict]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RequestError(f"input[{i}].content must be a string or a list of parts", "input")
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text", "refusal"):
            parts.append({"type": "text", "text": part.get("text", part.get("refusal", ""))})
        elif kind == "input_image" and isinstance(part.get("image_url"), str):
            parts.append({"type": "image_url", "image_url": {"url": part["image_url"]}})
        else:
            raise RequestError(f"input[{i}].content[{j}]: unsupported part {part!r:.120} (input_text, output_text, "
                               f"input_image with an image_url)", "input")
    return parts


def chat_tools(tools: list[dict] | None, tool_choice: Any) -> tuple[list[dict] | None, Any]:
    """The Responses' flat function tools / tool_choice in the chat completions' nested shape."""
    if tool_choice is not None and isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        tool_choice = {"type": "function", "function": {"name": tool_choice.get("name")}}
    if not tools:
        return None, tool_choice
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise RequestError(f"tools[{i}]: only function tools are supported, got {tool!r:.120}", "tools")
        out.append({"type": "function", "function": {k: tool[k] for k in ("name", "description", "parameters")
                                                      if k in tool}})
    return out, tool_choice


def response_format(text: dict | None) -> dict | None:
    fmt = (text or {}).get("format") or {"type": "text"}
    if fmt.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": fmt.get("name"), "schema": fmt.get("schema"),
                                                       "strict": fmt.get("strict")}}
    return {"type": fmt.get("type")}


class OutputItems:
    """Builds the response's output items from chat deltas, as events (streaming) and as the final list."""

    def __init__(self):
        self.items: list[dict] = []
        self.events: list[dict] = []
        self._open: dict | None = None

    def reasoning(self, text: str) -> None:
        item = self._item("reasoning", lambda: {"type": "reasoning", "id": new_id("rs"), "summary": [],
                                                "content": [{"type": "reasoning_text", "text": ""}]},
                          part=None)
        item["content"][0]["text"] += text
        self._event("response.reasoning_text.delta", item, content_index=0, delta=text)

    def text(self, text: str) -> None:
        item = self._item("message", lambda: {"type": "message", "id": new_id("msg"), "role": "assistant",
                                              "status": "in_progress", "content": []},
                          part={"type": "output_text", "text": "", "annotations": []})
        item["content"][0]["text"] += text
        self._event("response.output_text.delta", item, content_index=0, delta=text, logprobs=[])

    def call(self, call: dict) -> None:
        """A tool-call delta (index, id, function {name, arguments}); the first of an index opens its item."""
        fn = call.get("function") or {}
        if call.get("id"):
            self._item("function_call", lambda: {"type": "function_call", "id": new_id("fc"), "call_id": call["id"],
                                                 "name": fn.get("name"), "arguments": "", "status": "in_progress"},
                       part=None)
        item = self._open
        if fn.get("arguments"):
            item["arguments"] += fn["arguments"]
            self._event("response.function_call_arguments.delta", item, delta=fn["arguments"])

    def finish(self) -> None:
        self._close()

    # -- internals --------------------------------------------------------------------------------------------

    def _item(self, kind: str, make, part: dict | None) -> dict:
        if self._open is not None and self._open["type"] == kind and kind != "function_call":
            return self._open
        self._close()
        item = make()
        self._open = item
        self.items.append(item)
        self.events.append({"type": "response.output_item.added", "output_index": len(self.items) - 1,
                            "item": _copy(item)})
        if part is not None:
            item["content"].append(dict(part))
            self._event("response.content_part.added", item, content_index=0, part=dict(part))
        return item

    def _close(self) -> None:
        item, self._open = self._open, None
        if item is None:
            return
        if item["type"] == "reasoning":
            self._event("response.reasoning_text.done", item, content_index=0, text=item["content"][0]["text"])
        elif item["type"] == "message":
            part = item["content"][0]
            self._event("response.output_text.done", item, content_index=0, text=part["text"], logprobs=[])
            self._event("response.content_part.done", item, content_index=0, part=_copy(part))
        else:
            self._event("response.function_call_arguments.done", item, arguments=item["arguments"],
                        name=item["name"])
        if "status" in item:
            item["status"] = "completed"
        self.events.append({"type": "response.output_item.done", "output_index": self.items.index(item),
                            "item": _copy(item)})

    def _event(self, kind: str, item: dict, **fields: Any) -> None:
        self.events.append({"type": kind, "item_id": item["id"], "output_index": self.items.index(item), **fields})


def _copy(value: dict) -> dict:
    return json.loads(json.dumps(value))


def _chat_deltas(choice: dict) -> list[tuple[str, Any]]:
    """A chat choice (a stream chunk's delta or a whole message) as ordered (kind, value) pieces."""
    out: list[tuple[str, Any]] = []
    if choice.get("reasoning_content"):
        out.append(("reasoning", choice["reasoning_content"]))
    if choice.get("content"):
        out.append(("text", choice["content"]))
    for call in choice.get("tool_calls") or []:
        out.append(("call", call))
    return out


def _feed(items: OutputItems, pieces: list[tuple[str, Any]]) -> None:
    for kind, value in pieces:
        getattr(items, kind)(value)


class ResponsesAPI:
    """Registers the routes on an `OpenAIServer` and keeps the stored responses."""

    def __init__(self, server, max_stored: int = 1024):
        self.server, self.max_stored = server, max_stored
        self.stored: OrderedDict[str, Stored] = OrderedDict()
        server.add_route("POST", "/v1/responses", self.create)
        server.add_route("GET", "/v1/responses/{response_id}", self.retrieve)

    async def retrieve(self, response_id: str) -> dict:
        found = self.stored.get(response_id)
        if found is None:
            raise RequestError(f"no stored response {response_id!r}", "response_id", 404, "NotFoundError")
        return found.response

    async def create(self, body: ResponsesRequest, request: Request) -> Any:
        if body.background:
            raise RequestError("background responses are not supported by this server", "background")
        history = []
        if body.previous_response_id is not None:
            prev = self.stored.get(body.previous_response_id)
            if prev is None:
                raise RequestError(f"no stored response {body.previous_response_id!r}", "previous_response_id", 404,
                                   "NotFoundError")
            history = list(prev.messages)
        messages = history + input_messages(body.input)
        chat = self._chat_request(body, messages)
        base = self._response_base(body)
        if body.stream:  # errors found before the first token are plain 400s, as for chat completions
            chunks = await self.server.chat_completions_for(chat)
            return StreamingResponse(self._events(chunks, base, messages, body.store), media_type="text/event-stream")
        answer = await until_disconnected(request, self.server.chat_completions_for(chat))
        data = answer.model_dump() if isinstance(answer, BaseModel) else answer
        items = OutputItems()
        _feed(items, _chat_deltas(data["choices"][0]["message"]))
        items.finish()
        response = self._finished(base, items.items, data["choices"][0]["finish_reason"], data.get("usage"))
        self._store(body.store, messages, response)
        return response

    def _chat_request(self, body: ResponsesRequest, messages: list[dict]) -> ChatCompletionRequest:
        extras = {k: v for k, v in (body.model_extra or {}).items() if k in _CHAT_FIELDS}
        tools, tool_choice = chat_tools(body.tools, body.tool_choice)
        if body.instructions:
            messages = [{"role": "system", "content": body.instructions}] + messages
        try:
            return ChatCompletionRequest(
                **{**extras, "model": body.model, "messages": messages, "max_completion_tokens": body.max_output_tokens,
                   "temperature": body.temperature, "top_p": body.top_p, "stream": body.stream, "tools": tools,
                   "tool_choice": tool_choice, "response_format": response_format(body.text), "n": 1,
                   "stream_options": {"include_usage": True} if body.stream else None})
        except ValueError as e:  # pydantic's, on an extra of the wrong type
            raise RequestError(f"invalid request: {e}", None) from None

    def _response_base(self, body: ResponsesRequest) -> dict:
        return {"id": new_id("resp"), "object": "response", "created_at": now(),
                "model": body.model or self.server.config.served_model_name, "status": "in_progress", "output": [],
                "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
                "temperature": body.temperature, "top_p": body.top_p, "tools": body.tools or [],
                "tool_choice": body.tool_choice or "auto", "parallel_tool_calls": body.parallel_tool_calls,
                "previous_response_id": body.previous_response_id, "metadata": body.metadata or {},
                "text": body.text or {"format": {"type": "text"}}, "store": body.store, "error": None,
                "incomplete_details": None, "usage": None}

    @staticmethod
    def _finished(base: dict, items: list[dict], finish_reason: str | None, usage: dict | None) -> dict:
        response = {**base, "output": items, "status": "completed"}
        if finish_reason == "length":
            response.update(status="incomplete", incomplete_details={"reason": "max_output_tokens"})
        if usage is not None:
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
            reasoning = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens", 0)
            response["usage"] = {
                "input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"],
                "total_tokens": usage["total_tokens"],
                # the engine's prefix cache keeps every prompt block it computes
                "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": usage["prompt_tokens"] - cached},
                "output_tokens_details": {"reasoning_tokens": reasoning}}
        return response

    def _store(self, store: bool, messages: list[dict], response: dict) -> None:
        if not store:
            return
        self.stored[response["id"]] = Stored(messages + _answer_messages(response["output"]), response)
        while len(self.stored) > self.max_stored:
            self.stored.popitem(last=False)

    async def _events(self, chunks: Any, base: dict, messages: list[dict], store: bool) -> AsyncIterator[str]:
        seq = iter(range(1 << 62))

        def event(payload: dict) -> str:
            payload = {**payload, "sequence_number": next(seq)}
            return f"event: {payload['type']}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"

        yield event({"type": "response.created", "response": base})
        yield event({"type": "response.in_progress", "response": base})
        items, finish, usage = OutputItems(), None, None
        async with contextlib.aclosing(_sse_payloads(chunks)) as payloads:  # leaving early aborts the request
            async for chunk in payloads:
                if "error" in chunk:  # mid-stream failure: the chat stream's error, as a Responses error event
                    err = chunk["error"]
                    yield event({"type": "error", "code": str(err.get("code")), "message": err.get("message"),
                                 "param": err.get("param")})
                    return
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or []:
                    _feed(items, _chat_deltas(choice["delta"]))
                    finish = choice.get("finish_reason") or finish
                for e in items.events:
                    yield event(e)
                items.events.clear()
        items.finish()
        for e in items.events:
            yield event(e)
        response = self._finished(base, items.items, finish, usage)
        self._store(store, messages, response)
        kind = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
        yield event({"type": kind, "response": response})


def _answer_messages(output: list[dict]) -> list[dict]:
    """A response's output items as the chat messages that continue the conversation."""
    content = "".join(p["text"] for item in output if item["type"] == "message" for p in item["content"])
    calls = [{"id": item["call_id"], "type": "function",
              "function": {"name": item["name"], "arguments": item["arguments"]}}
             for item in output if item["type"] == "function_call"]
    return [{"role": "assistant", "content": content or None, **({"tool_calls": calls} if calls else {})}]


async def _sse_payloads(response: Any) -> AsyncIterator[dict]:
    """The JSON payloads of a chat handler's SSE stream (our own `data: {...}` chunks)."""
    if not isinstance(response, StreamingResponse):
        raise RequestError("this model did not stream", "stream")
    buffer = ""
    iterator = response.body_iterator
    try:
        async for piece in iterator:
            buffer += piece if isinstance(piece, str) else piece.decode()
            while "\n\n" in buffer:
                block, buffer = buffer.split("\n\n", 1)
                data = block.removeprefix("data: ")
                if data and data != "[DONE]":
                    yield json.loads(data)
    finally:
        await iterator.aclose()

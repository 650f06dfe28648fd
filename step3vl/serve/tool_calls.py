"""Tool calling: the request's `tools` / `tool_choice`, and the calls in the model's answer.

STEP3-VL writes its calls in the Hermes format of Qwen3 (what SGLang and vLLM parse for it with
`--tool-call-parser hermes`): each call is a JSON object `{"name": ..., "arguments": {...}}` between `<tool_call>`
and `</tool_call>`, optionally inside `<tool_calls>` … `</tool_calls>`. The parser reads the answer (after
`</think>`): the text outside the call blocks is the message content, each block that holds a well-formed call is a
tool call, and a block that does not stays content.

`tool_choice`:
- "auto" (the default when tools are given): the model decides; its calls are parsed.
- "none": the tools are still shown to the model (as OpenAI and vLLM do), nothing is parsed.
- "required" / {"type": "function", "function": {"name": ...}}: the answer is constrained by structured outputs
  (xgrammar) to a JSON array of calls / to the named function's arguments, as vLLM does it, so the call is
  well-formed by construction.

Streaming never takes back a sent delta: content is sent until a `<tool_call` marker could be starting, then held;
each call is sent whole (id, name and arguments in one delta) the moment its block closes; the held text that is
not a call goes out as content when the answer ends. The finished text parsed at once gives the same content and
calls as the stream (`ToolCallStream.feed(text, finished=True)`).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
MARKER = "<tool_call"  # also starts the optional `<tool_calls>` wrapper
_WRAPPERS = re.compile(r"</?tool_calls>")
_BLOCK = re.compile(re.escape(CALL_OPEN) + r"(.*?)" + re.escape(CALL_CLOSE), re.S)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_call(name: str, arguments: Any, call_id: str | None = None) -> dict:
    """OpenAI's tool call object; arguments are a JSON string on the wire."""
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": call_id or new_call_id(), "type": "function", "function": {"name": name, "arguments": args}}


def parse_call(block: str) -> dict | None:
    """One Hermes block's JSON → a tool call, or None when it is not a call."""
    try:
        obj = json.loads(block)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters"))
    return tool_call(obj["name"], {} if args is None else args)


def _held_tail(text: str) -> int:
    """Length of the longest suffix of `text` that could still grow into MARKER."""
    for n in range(min(len(MARKER) - 1, len(text)), 0, -1):
        if text.endswith(MARKER[:n]):
            return n
    return 0


@dataclass
class ToolCallStream:
    """Per choice: each `feed` of the answer so far returns (content delta, calls completed since the last feed)."""

    content_sent: int = 0  # characters of the answer sent as content before the first marker
    calls: list[dict] = field(default_factory=list)
    blocks_seen: int = 0  # closed blocks consumed (calls or not)

    def feed(self, text: str, finished: bool) -> tuple[str, list[dict]]:
        start = text.find(MARKER)
        if start < 0:
            upto = len(text) if finished else len(text) - _held_tail(text)
            delta, self.content_sent = text[self.content_sent:upto], max(self.content_sent, upto)
            return delta, []
        delta = text[self.content_sent:start]
        self.content_sent = start
        tail = text[start:]
        blocks = list(_BLOCK.finditer(tail))
        new = []
        for m in blocks[self.blocks_seen:]:
            call = parse_call(m.group(1).strip())
            if call is not None:
                new.append(call)
        self.blocks_seen = len(blocks)
        self.calls += new
        if finished:
            delta += self._leftover(tail)
        return delta, new

    @staticmethod
    def _leftover(tail: str) -> str:
        """The held text that is not a call: invalid blocks and text between or after calls (wrappers dropped)."""
        rest = _BLOCK.sub(lambda m: "" if parse_call(m.group(1).strip()) is not None else m.group(0), tail)
        rest = _WRAPPERS.sub("", rest)
        return rest if rest.strip() else ""


def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    """(content, calls) of a finished answer."""
    return ToolCallStream().feed(text, finished=True)


# -- the request side -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ToolPlan:
    """What a chat request asks of tools: mode is "off" (no tools), "none", "auto", "required" or "named"."""

    mode: str
    tools: list[dict]
    name: str | None = None  # the named function

    @property
    def parses_hermes(self) -> bool:
        return self.mode == "auto"

    def structured(self) -> dict | None:
        """The structured-output spec that forces the call for "required" / "named", else None."""
        if self.mode == "named":
            return {"json": _parameters(self._function(self.name))}
        if self.mode == "required":
            defs: dict[str, dict] = {}
            options = [{"type": "object", "properties": {"name": {"type": "string", "enum": [f["name"]]},
                                                         "parameters": _hoist_defs(_parameters(f), defs)},
                        "required": ["name", "parameters"]} for f in map(_fn, self.tools)]
            schema = {"type": "array", "minItems": 1, "items": {"anyOf": options}}
            return {"json": {**schema, **{k: v for k, v in defs.items() if v}}}
        return None

    def forced_calls(self, text: str) -> list[dict] | None:
        """The calls of a "required" answer (JSON by construction), or None when it is not a complete array of
        calls (cut by max_tokens)."""
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return None
        if isinstance(value, list) and all(isinstance(v, dict) and "name" in v for v in value):
            return [tool_call(v["name"], v.get("parameters", {})) for v in value]
        return None

    def _function(self, name: str) -> dict:
        return next(f for f in map(_fn, self.tools) if f["name"] == name)


NO_TOOLS = ToolPlan("off", [])


def _fn(tool: dict) -> dict:
    return tool["function"]


def _hoist_defs(schema: dict, defs: dict[str, dict]) -> dict:
    """`$defs` / `definitions` of a function's parameters, moved to the root of the combined "required" schema
    (its `#/$defs/...` references resolve from the root); the same name defined twice differently is an error."""
    schema = dict(schema)
    for key in ("$defs", "definitions"):
        for name, sub in (schema.pop(key, None) or {}).items():
            known = defs.setdefault(key, {})
            if name in known and known[name] != sub:
                raise ValueError(f"tools: two functions define {key}/{name} differently; a 'required' tool_choice "
                                 f"needs one definition per name")
            known[name] = sub
    return schema


def _parameters(function: dict) -> dict:
    return function.get("parameters") or {"type": "object", "properties": {}}


def answer_finish_reason(plan: ToolPlan, called: bool, reason: str | None) -> str | None:
    """OpenAI's: "tool_calls" when the answer ended by itself in calls ("stop" stays for a named function)."""
    return "tool_calls" if called and reason == "stop" and plan.mode in ("auto", "required") else reason


class ToolDeltas:
    """Per choice: the answer's text deltas → (content delta, tool-call deltas with their `index`)."""

    def __init__(self, plan: ToolPlan):
        self.plan, self.answer, self.count = plan, "", 0
        self.stream = ToolCallStream()
        self.named_id: str | None = None

    def delta(self, text: str, finished: bool) -> tuple[str, list[dict]]:
        self.answer += text
        mode = self.plan.mode
        if mode == "auto":
            content, calls = self.stream.feed(self.answer, finished)
            return content, self._indexed(calls)
        if mode == "named":  # the answer is the arguments: stream it as they come
            if self.named_id is None:
                self.named_id = new_call_id()
                return "", self._indexed([tool_call(self.plan.name, text, self.named_id)])
            return "", [{"index": 0, "function": {"arguments": text}}] if text else []
        if mode == "required":  # a JSON array of calls: parsed whole at the end
            calls = self.plan.forced_calls(self.answer) if finished else []
            return ("", self._indexed(calls)) if calls is not None else (self.answer, [])
        return text, []

    @property
    def called(self) -> bool:
        return self.count > 0

    def _indexed(self, calls: list[dict]) -> list[dict]:
        out = [{"index": self.count + i, **c} for i, c in enumerate(calls)]
        self.count += len(calls)
        return out

"""The OpenAI wire format (chat completions, completions, models, errors) as pydantic models, plus vLLM's
sampling extras (top_k, min_p, ignore_eos, stop_token_ids, ...), and the mapping onto `SamplingParams`.

Structured outputs come as OpenAI's `response_format` (json_object, json_schema), vLLM's `structured_outputs`
({json | json_object | regex | choice | grammar}) or its older `guided_json` / `guided_regex` / `guided_choice` /
`guided_grammar`; tools and tool_choice as OpenAI's (serve/tool_calls.py). Fields that would change what is computed
but that this engine does not implement are refused with a 400 naming the field instead of being silently ignored.
Unknown fields are ignored, as OpenAI clients send vendor extras freely.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from step3vl.engine.sampling_params import SamplingParams
from step3vl.serve.tool_calls import NO_TOOLS, ToolPlan


class RequestError(ValueError):
    """A request the server refuses: a 400 (or `status`) with OpenAI's error body, naming `param`."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error", extra: dict | None = None):
        super().__init__(message)
        self.param, self.status, self.kind = param, status, kind
        self.extra = extra or {}  # more fields for the error object


# Fields whose null means "the default" (the others are Optional already, or required).
_DEFAULT_ON_NULL = {"n", "stream", "logprobs", "presence_penalty", "frequency_penalty", "echo", "ignore_eos",
                    "skip_special_tokens", "include_stop_str_in_output", "min_tokens", "add_generation_prompt",
                    "max_tokens"}


def rejected(error: ValueError, default_param: str | None = None) -> RequestError:
    """The engine's ValueError as a 400: `SamplingParams.<field> ...` names the field."""
    msg = str(error)
    param = default_param
    if msg.startswith("SamplingParams."):
        param = msg.removeprefix("SamplingParams.").split(" ", 1)[0].split(":", 1)[0]
    return RequestError(msg, param)


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        """OpenAI clients send null for any field they leave unset: null takes the field's default."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k not in _DEFAULT_ON_NULL}
        return data

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    # vLLM's extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    truncate_prompt_tokens: int | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    cache_salt: str | None = None
    priority: int = 0  # vLLM's: for a server started with --scheduling-policy priority (lower first)
    use_beam_search: bool = False  # vLLM's: n beams (engine/beam_search.py), returned as one finished output
    length_penalty: float = 1.0

    def refuse_unsupported(self) -> None:
        if self.use_beam_search:
            self._refuse_with_beams()

    # Rules that beam search (ranked by the model's own log-probs) cannot honour: refused, not ignored.
    _NOT_WITH_BEAMS = ("stop", "stop_token_ids", "logit_bias", "top_k", "min_p", "repetition_penalty", "top_p",
                       "presence_penalty", "frequency_penalty", "min_tokens", "allowed_token_ids", "bad_words",
                       "logprobs", "prompt_logprobs")

    def _refuse_with_beams(self) -> None:
        neutral = {"repetition_penalty": 1.0, "top_p": 1.0, "top_k": -1}
        for name in self._NOT_WITH_BEAMS:
            value = getattr(self, name, None)
            if value and value != neutral.get(name):
                raise RequestError(f"{name} is not supported with use_beam_search", name)
        if self.structured() is not None:
            raise RequestError("structured outputs are not supported with use_beam_search", "use_beam_search")
        if not math.isfinite(self.length_penalty):
            raise RequestError("length_penalty must be a finite number", "length_penalty")

    def structured(self) -> dict[str, Any] | None:
        """The one structured-output spec of the request (SamplingParams.structured_outputs), or None."""
        specs = {name: spec for name, spec in self._structured_specs().items() if spec is not None}
        if len(specs) > 1:
            raise RequestError(f"give one structured-output field, not {sorted(specs)}", sorted(specs)[1])
        return next(iter(specs.values()), None)

    def _structured_specs(self) -> dict[str, dict | None]:
        def wrap(key: str, value: Any) -> dict | None:
            return None if value is None else {key: value}

        return {"structured_outputs": self.structured_outputs, "guided_json": wrap("json", self.guided_json),
                "guided_regex": wrap("regex", self.guided_regex), "guided_choice": wrap("choice", self.guided_choice),
                "guided_grammar": wrap("grammar", self.guided_grammar)}

    def token_bias(self) -> dict[int, float] | None:
        if not self.logit_bias:
            return None
        try:
            return {int(t): float(b) for t, b in self.logit_bias.items()}
        except ValueError:
            raise RequestError("logit_bias keys must be token ids", "logit_bias") from None

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def sampling_params(self, max_tokens: int | None, logprobs: int | None,
                        logits_processors: list | None = None, prompt_logprobs: int | None = None,
                        defaults: dict[str, Any] | None = None) -> SamplingParams:
        """A field the request leaves unset takes `defaults` (the engine's generation config), else OpenAI's
        (temperature 1, top_p 1); ValueError from SamplingParams names the field."""
        structured, bias = self.structured(), self.token_bias()
        defaults = defaults or {}

        def given(name: str, fallback: Any) -> Any:
            value = getattr(self, name)
            return defaults.get(name, fallback) if value is None else value

        try:
            return SamplingParams(
                n=self.n, temperature=given("temperature", 1.0), top_p=given("top_p", 1.0),
                top_k=given("top_k", 0), min_p=given("min_p", 0.0), presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty, repetition_penalty=given("repetition_penalty", 1.0),
                max_tokens=max_tokens, min_tokens=self.min_tokens, logit_bias=bias,
                allowed_token_ids=self.allowed_token_ids, bad_words=self.bad_words,
                truncate_prompt_tokens=self.truncate_prompt_tokens,
                structured_outputs=structured, stop=self.stop, stop_token_ids=self.stop_token_ids,
                seed=self.seed, logprobs=logprobs, prompt_logprobs=prompt_logprobs, ignore_eos=self.ignore_eos,
                skip_special_tokens=self.skip_special_tokens,
                include_stop_str_in_output=self.include_stop_str_in_output,
                logits_processors=list(logits_processors or []))
        except ValueError as e:
            raise rejected(e) from None


class ChatCompletionRequest(_Request):
    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    # vLLM's extras
    prompt_logprobs: int | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        self.tool_plan()
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError("top_logprobs needs logprobs=true", "top_logprobs")

    def _structured_specs(self) -> dict[str, dict | None]:
        return {**super()._structured_specs(), "response_format": self._response_format(),
                "tool_choice": self.tool_plan().structured()}

    def tool_plan(self) -> ToolPlan:
        return tool_plan(self.tools, self.tool_choice)

    def _response_format(self) -> dict | None:
        """OpenAI's response_format: text (no constraint), json_object, or json_schema {name, schema, strict}."""
        rf = self.response_format or {"type": "text"}
        kind = rf.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            return {"json_object": True}
        if kind == "json_schema":
            schema = (rf.get("json_schema") or {}).get("schema")
            if schema is None:
                raise RequestError("response_format json_schema needs json_schema.schema", "response_format")
            return {"json": schema}
        raise RequestError(f"response_format type {kind!r}: use text, json_object or json_schema", "response_format")

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def requested_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


def tool_plan(tools: list | None, tool_choice: Any) -> ToolPlan:
    """Check `tools` and `tool_choice` (400s naming the field) and say what the request asks of them."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise RequestError("tool_choice needs tools", "tool_choice")
        return NO_TOOLS
    functions = [_checked_function(i, tool) for i, tool in enumerate(tools)]
    names = [fn["name"] for fn in functions]
    if len(set(names)) != len(names):
        raise RequestError(f"tools: function names must be unique, got {names}", "tools")
    tools = [{"type": "function", "function": fn} for fn in functions]
    if tool_choice in (None, "auto"):
        return ToolPlan("auto", tools)
    if tool_choice == "none":
        return ToolPlan("none", tools)
    if tool_choice == "required":
        plan = ToolPlan("required", tools)
    elif isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if name not in names:
            raise RequestError(f"tool_choice names function {name!r}, which is not among the tools {names}",
                               "tool_choice")
        plan = ToolPlan("named", tools, name)
    else:
        raise RequestError(f"tool_choice {tool_choice!r}: use 'none', 'auto', 'required' or "
                           f"{{'type': 'function', 'function': {{'name': ...}}}}", "tool_choice")
    try:
        plan.structured()  # the schema the choice forces must be one (e.g. no clashing $defs across tools)
    except ValueError as e:
        raise RequestError(str(e), "tools") from None
    return plan


def _checked_function(i: int, tool: Any) -> dict:
    fn = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(fn, dict):
        raise RequestError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}", "tools")
    if not isinstance(fn.get("name"), str) or not fn["name"]:
        raise RequestError(f"tools[{i}].function.name must be a non-empty string", "tools")
    if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
        raise RequestError(f"tools[{i}].function.parameters must be a JSON schema object", "tools")
    return fn


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    prompt_logprobs: int | None = None  # vLLM's extra
    suffix: str | None = None
    best_of: int | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.suffix:
            raise RequestError("suffix (insertion) is not supported by this engine", "suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise RequestError("best_of other than n is not supported by this engine", "best_of")

    @property
    def echo_logprobs(self) -> bool:
        """Legacy echo + logprobs: the prompt's tokens come back with their log-probs too."""
        return self.echo and self.logprobs is not None

    @property
    def requested_prompt_logprobs(self) -> int | None:
        if self.prompt_logprobs is not None:
            return self.prompt_logprobs
        return self.logprobs if self.echo_logprobs else None

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise RequestError("prompt is empty", "prompt")
        if all(isinstance(t, int) for t in p):
            return [list(p)]
        return list(p)


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a prompt, or chat messages rendered with the chat template (images laid out)."""
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Any] | None = None

    def tool_plan(self) -> ToolPlan:
        return tool_plan(self.tools, None)


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[int]


# -- responses --------------------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int] | None = None
    completion_tokens_details: dict[str, int] | None = None  # reasoning_tokens, with the reasoning split on

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> "Usage":
        details = None if cached_tokens is None else {"cached_tokens": cached_tokens}
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens, prompt_tokens_details=details)


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # [{id, type: "function", function: {name, arguments}}]


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    # A chat model added beside the base (OpenAIServer.add_chat_model, e.g. by a plugin) may attach fields of its
    # own: PaCoRe's models put their per-round record (rounds, messages, tokens) under `pacore`.
    model_config = ConfigDict(extra="allow")

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: list | None = None  # vLLM's, when the request asked for them


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: list | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "step3vl"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def error_body(message: str, kind: str, param: str | None, status: int) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}

"""An OpenAI-compatible HTTP server over `AsyncLLM` (FastAPI): /v1/chat/completions, /v1/completions,
/v1/responses (serve/responses_api.py), /v1/models, /tokenize, /detokenize, /reset_prefix_cache, /health, /version, /stats, /metrics (Prometheus).

Every request runs on the one engine, batched continuously with all the others; `n` samples of a request are
forked from one prefill. A client that disconnects (or closes its stream) aborts its request, which frees its
KV at once. Errors use OpenAI's body (`{"error": {"message", "type", "param", "code"}}`) and name the field.

More chat models can be served beside the checkpoint's own through `add_chat_model(name, handler)`, and more
routes through `add_route`: PaCoRe registers its presets and `POST /v1/pacore` that way (pacore/serve.py, from the
`pacore` plugin's server extension: step3vl/plugins.py), so the server itself knows nothing about PaCoRe.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable

import jinja2
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from step3vl import __version__
from step3vl.engine.async_llm import AsyncLLM, EngineDeadError
from step3vl.engine.llm import EngineSleepingError, PreparedPrompt
from step3vl.engine.beam_search import BeamSearchParams
from step3vl.engine.outputs import CompletionOutput, RequestOutput
from step3vl.engine.sampling_params import SamplingParams
from step3vl.serve.media import MediaPolicy, resolve_images
from step3vl.serve.metrics import ServerMetrics, engine_state
from step3vl.serve.protocol import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest,
                                    CompletionResponse, DetokenizeRequest, ModelCard, ModelList, RequestError,
                                    TokenizeRequest, error_body, new_id, now)
from step3vl.serve.responses import (StreamState, chat_choice, completion_choices, sse, usage_of,
                                     vllm_prompt_logprobs)
from step3vl.serve.responses_api import ResponsesAPI
from step3vl.serve.streams import event_stream, gather_or_cancel, last, merge, until_disconnected
from step3vl.serve.tool_calls import NO_TOOLS, ToolPlan

logger = logging.getLogger(__name__)
ChatHandler = Callable[["OpenAIServer", ChatCompletionRequest, list[dict]], Awaitable[Any]]


@dataclass(slots=True)
class ServerConfig:
    served_model_name: str = "step3vl"
    reasoning_parser: bool = True  # split `<think>…</think>` into reasoning_content
    media: MediaPolicy = field(default_factory=MediaPolicy)
    # Applied to every request (vLLM's --logits-processors): fn(output_ids, logits_row) -> logits_row.
    logits_processors: list = field(default_factory=list)
    api_key: str | None = None  # when set, /v1/* and /tokenize need `Authorization: Bearer <key>`
    # With the reasoning parser, a chat request's structured output (response_format, ...) applies to the answer
    # after </think>, not to the reasoning.
    structured_after_reasoning: bool = True
    max_n: int | None = 64  # the most samples one request may ask for, all its prompts together (None: no limit)
    # The largest request body (bytes), refused with a 413 before it is read whole: a 50 MB message would otherwise
    # be parsed and tokenized before any length check. Images as data: URLs count (32 MiB images fit).
    max_body_bytes: int = 48 << 20
    # The longest prompt text, in characters, tokenized at all (None: 32 per token of the context, more than any
    # tokenizer needs): an over-long prompt is refused before tokenizing it, not after seconds of work.
    max_prompt_chars: int | None = None
    max_images_per_prompt: int | None = None  # vLLM's --limit-mm-per-prompt image=N (None: no limit)
    # A client that stops sending its body for this long gets a 408 and the connection's task ends (a slow-body
    # client would otherwise hold a worker forever).
    body_timeout_s: float = 30.0
    # Parse the Hermes <tool_call> blocks of answers to requests with tools (tool_choice "auto"); off, the text is
    # returned as content. "required" and named tool choices are always honoured (structured outputs).
    tool_call_parser: bool = True
    # POST /sleep?level=1|2, POST /wake_up[?tags=weights&tags=kv_cache], GET /is_sleeping (vLLM's dev-mode
    # endpoints): a trainer colocated with the server takes the device between rollouts.
    enable_sleep_mode: bool = False


def _prompt_count(prompt: Any) -> int:
    """Prompts in a completions `prompt`: a string or a token list is one; a list of them is several."""
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return len(prompt)
    return 1


def _prompt_chars(prompt: Any) -> int:
    if isinstance(prompt, str):
        return len(prompt)
    if isinstance(prompt, dict) and isinstance(prompt.get("prompt"), str):
        return len(prompt["prompt"])
    return 0


class BodyLimit:
    """ASGI middleware: a request whose body exceeds `limit` bytes gets a 413 at once (its Content-Length is
    checked before reading; a chunked body is counted as it arrives and cut off at the limit), and one whose body
    stalls for `timeout_s` between two pieces gets a 408."""

    def __init__(self, app, limit: int, timeout_s: float = 30.0):
        self.app, self.limit, self.timeout_s = app, limit, timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._refuse(send, int(length))
        seen, refused, body_done = 0, False, False

        async def counted():
            # Over the limit: answer 413 now and tell the app the client left, so it stops reading the body.
            nonlocal seen, refused, body_done
            if refused:
                return {"type": "http.disconnect"}
            if body_done:  # the app now waits for a disconnect, however long its answer takes: no timeout
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.timeout_s)
            except asyncio.TimeoutError:
                refused = True
                await self._refuse(send, seen, 408, f"the request body stalled for {self.timeout_s:g} s "
                                                    f"({seen} bytes received)")
                return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                body_done = not message.get("more_body", False)
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    refused = True
                    await self._refuse(send, seen)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if not refused:  # after the 413 the app's own answer (to a "disconnected" client) goes nowhere
                await send(message)

        try:
            await self.app(scope, counted, guarded_send)
        except Exception:
            if not refused:  # the app's failure, not the cut-off body's consequence
                raise

    async def _refuse(self, send, size: int, status: int = 413, message: str | None = None) -> None:
        message = message or f"the request body ({size} bytes so far) is over this server's limit of {self.limit} bytes"
        kind = "RequestTooLarge" if status == 413 else "RequestTimeout"
        body = json.dumps(error_body(message, kind, None, status)).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class OpenAIServer:
    def __init__(self, engine: AsyncLLM, config: ServerConfig | None = None):
        self.engine = engine
        self.config = config or ServerConfig()
        self.llm = engine.llm
        self.tokenizer = engine.llm.get_tokenizer()
        self._chat_models: dict[str, ChatHandler] = {self.config.served_model_name: OpenAIServer._chat}
        self.metrics = ServerMetrics(self.config.served_model_name)
        self.app = self._build_app()

    @property
    def max_model_len(self) -> int:
        return self.llm.max_model_len

    def add_chat_model(self, name: str, handler: ChatHandler) -> None:
        if name in self._chat_models:
            raise ValueError(f"a model named {name!r} is already served")
        self._chat_models[name] = handler
        logger.debug("chat model %r added", name)

    # -- app ------------------------------------------------------------------------------------------

    def _build_app(self) -> FastAPI:
        # With an API key the interactive docs and the schema would be the one unauthenticated view of the API: off.
        docs = {} if self.config.api_key is None else dict(docs_url=None, redoc_url=None, openapi_url=None)
        app = FastAPI(title="step3vl", version=__version__, **docs)
        app.add_middleware(BodyLimit, limit=self.config.max_body_bytes, timeout_s=self.config.body_timeout_s)
        app.add_exception_handler(RequestError, self._request_error)
        app.add_exception_handler(RequestValidationError, self._validation_error)
        app.add_exception_handler(EngineDeadError, self._engine_dead)
        app.add_exception_handler(EngineSleepingError, self._engine_sleeping)
        app.get("/health")(self.health)
        app.get("/version")(self.version)
        app.get("/metrics")(self.prometheus)  # open, as Prometheus scrapers expect
        self.app = app
        self.add_route("GET", "/stats", self.stats)
        self.add_route("GET", "/v1/models", self.models)
        self.add_route("POST", "/v1/chat/completions", self.chat_completions)
        self.add_route("POST", "/v1/completions", self.completions)
        self.add_route("POST", "/tokenize", self.tokenize)
        self.add_route("POST", "/detokenize", self.detokenize)
        self.add_route("POST", "/reset_prefix_cache", self.reset_prefix_cache)
        if self.config.enable_sleep_mode:
            self.add_route("POST", "/sleep", self.sleep)
            self.add_route("POST", "/wake_up", self.wake_up)
            self.add_route("GET", "/is_sleeping", self.is_sleeping)
        self.responses = ResponsesAPI(self)
        return app

    def add_route(self, method: str, path: str, endpoint: Callable) -> None:
        """A route behind the API key (when one is set)."""
        self.app.add_api_route(path, endpoint, methods=[method], dependencies=[Depends(self._check_key)])

    async def _check_key(self, request: Request) -> None:
        key = self.config.api_key
        given = request.headers.get("authorization", "")
        if key is not None and not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise RequestError("invalid or missing API key (Authorization: Bearer <key>)", None, 401,
                               "AuthenticationError")

    async def health(self) -> Response:
        return Response(status_code=200 if self.engine.is_running else 503)

    async def version(self) -> dict:
        return {"version": __version__}

    async def stats(self) -> dict:
        return await self.engine.call(lambda llm: llm.kv_stats())

    async def reset_prefix_cache(self) -> dict:
        return {"blocks_dropped": await self.engine.call(lambda llm: llm.reset_prefix_cache())}

    async def sleep(self, level: int = 1) -> dict:
        try:
            freed = await self.engine.call(lambda llm: llm.sleep(level))
        except ValueError as e:
            raise RequestError(str(e), "level") from None
        except RuntimeError as e:  # requests in flight
            raise RequestError(str(e), None, 409, "ConflictError") from None
        return {"is_sleeping": True, "level": level, "bytes_freed": freed}

    async def wake_up(self, tags: list[str] | None = Query(None)) -> dict:
        try:
            await self.engine.call(lambda llm: llm.wake_up(tags))
        except ValueError as e:
            raise RequestError(str(e), "tags") from None
        return {"is_sleeping": self.llm.is_sleeping()}

    async def is_sleeping(self) -> dict:
        return {"is_sleeping": self.llm.is_sleeping()}

    async def prometheus(self) -> Response:
        state = await self.engine.call(engine_state)
        return Response(self.metrics.render(state), media_type=CONTENT_TYPE_LATEST)

    async def models(self) -> ModelList:
        root = str(self.llm.model_path)
        return ModelList(data=[ModelCard(id=name, root=root, max_model_len=self.max_model_len)
                               for name in self._chat_models])

    async def tokenize(self, body: TokenizeRequest) -> dict:
        if body.messages is not None:
            prompt: Any = self.render_chat(body, await resolve_images(body.messages, self.config.media))
        elif body.prompt is not None:
            prompt = body.prompt
        else:
            raise RequestError("give prompt or messages", "prompt")
        try:
            prepared = await asyncio.to_thread(self.llm.prepare, prompt)
        except ValueError as e:
            raise RequestError(str(e), "messages" if body.messages is not None else "prompt") from None
        return {"tokens": prepared.token_ids, "count": len(prepared.token_ids), "max_model_len": self.max_model_len}

    async def detokenize(self, body: DetokenizeRequest) -> dict:
        vocab = self.llm.model.cfg.text.vocab_size
        bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestError(f"token id {bad} is outside the vocabulary [0, {vocab})", "tokens")
        return {"prompt": self.tokenizer.decode(body.tokens)}

    def _check_n(self, body) -> None:
        """n samples (or beams) per prompt, over every prompt of the request, against --max-n."""
        limit = self.config.max_n
        prompts = _prompt_count(getattr(body, "prompt", None))
        if limit is not None and body.n * prompts > limit:
            what = f"n = {body.n}" if prompts == 1 else f"n × prompts = {body.n} × {prompts} = {body.n * prompts}"
            raise RequestError(f"{what} is over this server's limit of {limit} samples per request", "n")

    def _check_images(self, messages: Any) -> None:
        limit = self.config.max_images_per_prompt
        if limit is None or not isinstance(messages, list):
            return
        count = sum(1 for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list)
                    for part in m["content"] if isinstance(part, dict) and part.get("type") in ("image_url", "image"))
        if count > limit:
            raise RequestError(f"{count} images are over this server's limit of {limit} per request "
                               f"(--limit-mm-per-prompt)", "messages")

    def _check_priority(self, body) -> None:
        try:
            self.engine.llm.engine.check_priority(body.priority)
        except ValueError as e:
            raise RequestError(str(e).replace("scheduling_policy='priority'", "--scheduling-policy priority"),
                               "priority") from e

    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Any:
        return await until_disconnected(request, self.chat_completions_for(body))

    async def chat_completions_for(self, body: ChatCompletionRequest) -> Any:
        """A chat request through its model's handler: the response, or a StreamingResponse when it streams."""
        body.refuse_unsupported()
        self._check_n(body)
        self._check_priority(body)
        name = body.model or self.config.served_model_name
        handler = self._chat_models.get(name)
        if handler is None:
            raise RequestError(f"The model `{name}` does not exist. Served: {sorted(self._chat_models)}",
                               "model", 404, "NotFoundError")
        self._check_images(body.messages)  # before any picture is fetched or decoded
        messages = await resolve_images(body.messages, self.config.media)
        return await handler(self, body, messages)

    async def completions(self, body: CompletionRequest, request: Request) -> Any:
        body.refuse_unsupported()
        self._check_n(body)
        self._check_priority(body)
        if body.model not in (None, self.config.served_model_name):
            raise RequestError(f"The model `{body.model}` does not serve completions; use "
                               f"`{self.config.served_model_name}`", "model", 404, "NotFoundError")
        return await until_disconnected(request, self._completion(body))

    # -- shared steps ---------------------------------------------------------------------------------

    async def prepare(self, prompt: Any, max_tokens: int | None, param: str,
                      truncate: int | None = None) -> tuple[PreparedPrompt, int]:
        """Tokenize on a worker thread and check the context: returns the prompt and the max_tokens to use
        (what is left of max_model_len when the request named none). `truncate`: the request's
        truncate_prompt_tokens, which the engine applies; the context is checked for the truncated prompt."""
        if self.llm.is_sleeping():  # before a stream starts: a plain 503, not an error event
            raise EngineSleepingError("the engine is asleep (POST /sleep): POST /wake_up first")
        chars = _prompt_chars(prompt)
        limit_chars = self.config.max_prompt_chars or 32 * self.max_model_len
        if chars > limit_chars:
            raise RequestError(f"the prompt has {chars} characters, over this server's limit of {limit_chars} "
                               f"(the context is {self.max_model_len} tokens); it was not tokenized", param)
        try:
            prepared = await asyncio.to_thread(self.llm.prepare, prompt)
        except ValueError as e:
            raise RequestError(str(e), param) from None
        n, limit = len(prepared.token_ids), self.max_model_len
        if truncate is not None:
            if truncate < 1 and truncate != -1:
                raise RequestError(f"truncate_prompt_tokens = {truncate}: must be >= 1, or -1 (as many as fit)",
                                   "truncate_prompt_tokens")
            n = min(n, limit - 1 if truncate == -1 else truncate)
        if n == 0:
            raise RequestError("the prompt is empty", param)
        # vLLM's wording, word for word: clients key on it (the official PaCoRe client retries without max_tokens
        # when it reads "Please reduce the length").
        what = "messages" if param == "messages" else "prompt"
        if n >= limit:
            raise RequestError(f"This model's maximum context length is {limit} tokens. However, you requested "
                               f"{n} tokens in the {what}, Please reduce the length of the {what}.", param)
        if max_tokens is None:
            return prepared, limit - n
        if n + max_tokens > limit:
            raise RequestError(f"This model's maximum context length is {limit} tokens. However, you requested "
                               f"{n + max_tokens} tokens ({n} in the {what}, {max_tokens} in the completion). "
                               f"Please reduce the length of the {what} or completion.", "max_tokens")
        return prepared, max_tokens

    def render_chat(self, body: ChatCompletionRequest | TokenizeRequest, messages: list[dict]) -> dict:
        kwargs = dict(body.chat_template_kwargs or {})
        if body.tools:  # the checked list, in OpenAI's shape, as transformers passes `tools` to templates
            kwargs["tools"] = body.tool_plan().tools
        try:
            text, images = self.llm.processor.apply_chat_template(
                messages, add_generation_prompt=body.add_generation_prompt, **kwargs)
        except (ValueError, jinja2.TemplateError) as e:
            raise RequestError(f"{type(e).__name__}: {e}", "messages") from None
        except TypeError as e:  # chat_template_kwargs colliding with the template's own arguments, or odd messages
            param = "chat_template_kwargs" if body.chat_template_kwargs else "messages"
            raise RequestError(f"{param}: {e}", param) from None
        return {"prompt": text, "images": images, "cache_salt": getattr(body, "cache_salt", None)}

    def _after_reasoning(self, params: SamplingParams) -> SamplingParams:
        think_end = getattr(self.tokenizer, "think_end_id", None)
        spec = params.structured_outputs
        if spec is not None and think_end is not None and self.config.reasoning_parser \
                and self.config.structured_after_reasoning:
            params.structured_outputs = dataclasses.replace(spec, after_token=think_end)
        return params

    def count_finished(self, outs: list[RequestOutput]) -> None:
        """Each choice by its finish reason; one a dropped stream left unfinished counts as "abort"."""
        usage = usage_of(outs)
        self.metrics.finished([c.finish_reason or "abort" for o in outs for c in o.outputs], usage.prompt_tokens,
                              usage.completion_tokens, [o.metrics for o in outs if o.finished])

    # -- errors ---------------------------------------------------------------------------------------

    def _error(self, message: str, kind: str, param: str | None, status: int, extra: dict | None = None) -> JSONResponse:
        self.metrics.error(status)
        body = error_body(message, kind, param, status)
        body["error"].update(extra or {})
        return JSONResponse(body, status_code=status)

    async def _request_error(self, _: Request, e: RequestError) -> JSONResponse:
        return self._error(str(e), e.kind, e.param, e.status, e.extra)

    async def _validation_error(self, _: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        msg = first.get("msg", "invalid request")
        if not loc:  # the body as a whole (str(e) would show our source file and line to the client)
            return self._error(f"request body: {msg} (send a JSON object with Content-Type: application/json)",
                               "invalid_request_error", None, 400)
        return self._error(f"{loc}: {msg}", "invalid_request_error", loc, 400)

    async def _engine_dead(self, _: Request, e: EngineDeadError) -> JSONResponse:
        return self._error(str(e), "EngineDeadError", None, 503)

    async def _engine_sleeping(self, _: Request, e: EngineSleepingError) -> JSONResponse:
        return self._error(str(e), "EngineSleepingError", None, 503)

    # -- chat -----------------------------------------------------------------------------------------

    def _max_tokens(self, requested: int | None) -> int | None:
        """The request's budget, else the generation config's max_new_tokens, else what the context leaves."""
        return requested if requested is not None else self.llm.sampling_defaults.get("max_tokens")

    async def _chat(self, body: ChatCompletionRequest, messages: list[dict]) -> Any:
        prepared, max_tokens = await self.prepare(self.render_chat(body, messages),
                                                  self._max_tokens(body.requested_max_tokens), "messages",
                                                  body.truncate_prompt_tokens)
        params = self._after_reasoning(body.sampling_params(max_tokens, body.requested_logprobs,
                                                            self.config.logits_processors, body.prompt_logprobs,
                                                            self.llm.sampling_defaults))
        rid = new_id("chatcmpl")
        stream = self._generate(body, prepared, params, rid)
        if body.stream:
            return event_stream(self._chat_events(stream, rid, body))
        out = await last(stream)
        self.count_finished([out])
        choices = [chat_choice(c, self.tokenizer, self.config.reasoning_parser, body.requested_logprobs,
                               self._tools(body)) for c in out.outputs]
        return ChatCompletionResponse(id=rid, model=body.model or self.config.served_model_name, choices=choices,
                                      usage=usage_of([out], self._think_end()),
                                      prompt_logprobs=vllm_prompt_logprobs(self.tokenizer, out))

    def _generate(self, body: ChatCompletionRequest | CompletionRequest, prepared: PreparedPrompt,
                  params: SamplingParams, rid: str) -> AsyncIterator[RequestOutput]:
        if body.use_beam_search:
            return self._beams(prepared, params, rid, body.length_penalty)
        return self.engine.generate(prepared, params, rid, final_only=not body.stream, priority=body.priority)

    async def _beams(self, prepared: PreparedPrompt, params: SamplingParams, rid: str,
                     length_penalty: float) -> AsyncIterator[RequestOutput]:
        """vLLM's use_beam_search: n beams as the choices of one finished output (a stream gets it in one chunk)."""
        found = await self.engine.beam_search(prepared, BeamSearchParams(
            params.n, params.max_tokens, params.ignore_eos, params.temperature, length_penalty,
            params.include_stop_str_in_output))
        yield RequestOutput(rid, prepared.prompt, prepared.token_ids, [
            CompletionOutput(j, s.output_text, s.output_token_ids, s.cum_logprob, None, s.finish_reason)
            for j, s in enumerate(found.sequences)], True)

    def _think_end(self) -> int | None:
        """The `</think>` id when answers are split into reasoning and content (usage counts reasoning tokens)."""
        return getattr(self.tokenizer, "think_end_id", None) if self.config.reasoning_parser else None

    def _tools(self, body: ChatCompletionRequest) -> ToolPlan:
        plan = body.tool_plan()
        return plan if self.config.tool_call_parser or plan.mode != "auto" else NO_TOOLS

    async def _chat_events(self, stream: AsyncIterator[RequestOutput], rid: str,
                           body: ChatCompletionRequest) -> AsyncIterator[str]:
        state, created = StreamState(self.config.reasoning_parser, self._tools(body)), now()
        head = {"id": rid, "object": "chat.completion.chunk", "created": created,
                "model": body.model or self.config.served_model_name}
        top_n, out = body.requested_logprobs, None
        try:
            async with contextlib.aclosing(stream):
                async for out in stream:
                    choices = state.chat_deltas(out, self.tokenizer, top_n)
                    if choices:
                        yield sse({**head, "choices": choices})
        finally:  # also when the client went away mid-stream (GeneratorExit at a yield)
            if out is not None:
                self.count_finished([out])
        if body.include_usage and out is not None:
            yield sse({**head, "choices": [], "usage": usage_of([out], self._think_end()).model_dump()})

    # -- completions ----------------------------------------------------------------------------------

    async def _completion(self, body: CompletionRequest) -> Any:
        prompts = body.prompts()
        prepared = [await self.prepare(p, self._max_tokens(body.max_tokens), "prompt", body.truncate_prompt_tokens)
                    for p in prompts]
        rid = new_id("cmpl")
        streams, echoes = [], []
        for i, (p, max_tokens) in enumerate(prepared):
            params = body.sampling_params(max_tokens, body.logprobs, self.config.logits_processors,
                                          body.requested_prompt_logprobs, self.llm.sampling_defaults)
            streams.append(self._generate(body, p, params, f"{rid}-{i}"))
            echoes.append(self._echo(body, p))
        model = body.model or self.config.served_model_name
        if body.stream:
            return event_stream(self._completion_events(streams, echoes, rid, model, body))
        outs = await gather_or_cancel([last(s) for s in streams])
        self.count_finished(outs)
        choices = [c for i, out in enumerate(outs)
                   for c in completion_choices(i * body.n, out, self.tokenizer, body.logprobs, echoes[i],
                                               body.echo_logprobs)]
        return CompletionResponse(id=rid, model=model, choices=choices, usage=usage_of(list(outs)))

    def _echo(self, body: CompletionRequest, p: PreparedPrompt) -> str:
        if not body.echo:
            return ""
        return p.prompt if p.prompt is not None else self.tokenizer.decode(p.token_ids)

    async def _completion_events(self, streams: list, echoes: list[str], rid: str, model: str,
                                 body: CompletionRequest) -> AsyncIterator[str]:
        state = StreamState(reasoning=False)
        head = {"id": rid, "object": "text_completion", "created": now(), "model": model}
        finals: dict[int, RequestOutput] = {}
        try:
            async for i, out in merge(streams):
                finals[i] = out
                choices = state.text_deltas(out, self.tokenizer, body.logprobs, i * body.n, echoes[i],
                                            body.echo_logprobs)
                if choices:
                    yield sse({**head, "choices": choices})
        finally:  # also when the client went away mid-stream
            self.count_finished(list(finals.values()))
        if body.include_usage:
            yield sse({**head, "choices": [], "usage": usage_of(list(finals.values())).model_dump()})

"""PaCoRe behind the OpenAI-compatible server: chat models `<name>-pacore-<preset>` and `POST /v1/pacore`.

Each problem runs the same round state machine as `PaCoRe.run` (problem_run.py), driven by `AsyncLLM`: a round
is one request with n = K_r on the shared engine, so PaCoRe problems, their rounds and plain chat requests all
batch together, and a problem's next round starts the moment its last trajectory ends. With the same config and
seed a problem gets the same result here as from `PaCoRe.run` (seeded samples do not depend on the batch).

A chat request to a PaCoRe model answers with the final trajectory's message as `content`, its reasoning as
`reasoning_content`, every round's accounting under `pacore`, and every generated token in `usage`. With
`stream: true` the final round's tokens stream live (the earlier rounds run first, in silence).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
import uuid
from typing import Any, Callable

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict

from step3vl.engine.async_llm import AsyncLLM
from step3vl.engine.outputs import RequestOutput
from step3vl.serve.media import resolve_images
from step3vl.serve.protocol import (ChatChoice, ChatCompletionRequest, ChatCompletionResponse, ChatMessage,
                                    RequestError, Usage, error_body, new_id, now)
from step3vl.serve.reasoning import THINK_END, split_reasoning
from step3vl.serve.responses import sse
from step3vl.serve.server import OpenAIServer
from step3vl.serve.streams import gather_or_cancel, until_disconnected

from step3vl_pacore.config import PRESETS, PaCoReConfig
from step3vl_pacore.problem import Problem
from step3vl_pacore.problem_run import ProblemRun
from step3vl_pacore.result import PaCoReResult
from step3vl_pacore.runner import as_problem, check_unique_ids
from step3vl_pacore.seeds import think_end_marker

FinalRoundHook = Callable[[RequestOutput], None]
CHAT_PROBLEM_ID = "chat"  # a chat request's problem id: `PaCoRe.run` on Problem("chat", messages) reproduces it


async def run_problem(engine: AsyncLLM, config: PaCoReConfig, problem: Problem, tag: str | None = None,
                      on_final_round: FinalRoundHook | None = None, priority: int = 0) -> PaCoReResult:
    """One problem's rounds on a shared engine (from any asyncio code, not only the server). Cancelling it aborts
    the round in flight. `tag` prefixes its engine request ids (default: a fresh one). `priority` goes with every
    round's request (an engine with scheduling_policy='priority')."""
    tag = tag or _tag()
    llm = engine.llm
    run = ProblemRun(problem, config, llm.processor, think_end_marker(llm.get_tokenizer()), llm.model.device, tag)
    req = await asyncio.to_thread(run.start)  # loads the problem's images
    while req is not None:
        live = on_final_round is not None and run.round == config.num_rounds - 1
        out = None
        try:
            async with contextlib.aclosing(engine.generate(req.prompt, req.params, req.request_id,
                                                           final_only=not live, priority=priority)) as stream:
                async for out in stream:
                    if live:
                        on_final_round(out)
        except ValueError as e:
            if out is not None:
                raise
            run.submit_failed(e)  # the engine refused the round's prompt (too long, bad image)
            break
        req = await asyncio.to_thread(run.finish_round, out)
    return run.result


class PaCoReRequest(BaseModel):
    """`POST /v1/pacore`: the official batch input (problems with id + messages) and the method's knobs."""
    model_config = ConfigDict(extra="forbid")

    problems: list[dict[str, Any]]
    preset: str | None = None
    rounds: list[int] | None = None
    max_tokens: int | None = None
    message_max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    unclosed_policy: str | None = None
    record_reasoning: bool | None = None


class PaCoReService:
    """Registers PaCoRe on an `OpenAIServer`: one chat model per preset, and the batch route."""

    def __init__(self, server: OpenAIServer, base: PaCoReConfig, presets: list[str] | None = None,
                 max_trajectories: int | None = 64, max_problems: int | None = 64):
        self.max_trajectories = max_trajectories  # per problem, all rounds together (None: no limit)
        self.max_problems = max_problems  # per POST /v1/pacore (None: no limit)
        if server.config.logits_processors and base.sampling_hook is None:
            base = dataclasses.replace(base, sampling_hook=_with_processors(server.config.logits_processors))
        self.server, self.engine, self.base = server, server.engine, base
        presets = list(PRESETS) if presets is None else presets
        unknown = [p for p in presets if p not in PRESETS]
        if unknown:
            raise ValueError(f"unknown PaCoRe preset(s) {unknown}; choose from {sorted(PRESETS)}")
        for name in presets:
            model = f"{server.config.served_model_name}-pacore-{name}"
            server.add_chat_model(model, self._chat_handler(name))
        server.add_route("POST", "/v1/pacore", self._batch_route)

    def config_for(self, preset: str | None, rounds: list[int] | None = None, **overrides: Any) -> PaCoReConfig:
        changes = {k: v for k, v in overrides.items() if v is not None}
        if preset is not None and rounds is not None:
            raise RequestError("give either preset or rounds, not both", "rounds")
        if preset is not None:
            if preset not in PRESETS:
                raise RequestError(f"unknown PaCoRe preset {preset!r}; choose from {sorted(PRESETS)}", "preset")
            changes["rounds"] = list(PRESETS[preset])
        elif rounds is not None:
            changes["rounds"] = rounds
        try:
            cfg = dataclasses.replace(self.base, **changes)
        except (ValueError, TypeError) as e:
            raise RequestError(str(e), str(e).split(" ", 1)[0].removeprefix("PaCoReConfig.")) from None
        limit = self.max_trajectories
        if limit is not None and cfg.trajectories_per_problem > limit:
            raise RequestError(f"rounds {cfg.schedule} are {cfg.trajectories_per_problem} trajectories per problem, "
                               f"over this server's limit of {limit}", "rounds")
        return cfg

    # -- chat models ----------------------------------------------------------------------------------

    def _chat_handler(self, preset: str):
        async def handler(server: OpenAIServer, body: ChatCompletionRequest, messages: list[dict]) -> Any:
            if body.n != 1:
                raise RequestError("a PaCoRe model gives one synthesized answer: n must be 1", "n")
            _refuse_plain_only(body)
            # Like any OpenAI model: random without a seed, reproducible with one (the round seeds hash the seed
            # with the problem id, so every chat problem has the same id).
            seed = body.seed if body.seed is not None else secrets.randbits(63)
            cfg = self.config_for(preset, max_tokens=body.requested_max_tokens, temperature=body.temperature,
                                  top_p=body.top_p, seed=seed)
            problem = Problem(id=CHAT_PROBLEM_ID, messages=messages)
            model = body.model or ""
            if body.stream:
                return StreamingResponse(self._chat_events(cfg, problem, model, body), media_type="text/event-stream")
            result = await run_problem(self.engine, cfg, problem, _tag(), priority=body.priority)
            _raise_if_failed(result)
            choice, usage = _choice(result), _usage(result)
            server.metrics.finished([choice.finish_reason], usage.prompt_tokens, usage.completion_tokens)
            return ChatCompletionResponse(id=new_id("chatcmpl"), model=model, choices=[choice], usage=usage,
                                          pacore=result.to_dict())
        return handler

    async def _chat_events(self, cfg: PaCoReConfig, problem: Problem, model: str, body: ChatCompletionRequest):
        """The final round's reasoning streams live up to its first </think>; the rest of the reasoning (up to the
        last </think>, PaCoRe's split) and the answer follow when the problem is done, so the streamed text always
        equals the non-streamed response."""
        live = _LiveReasoning(enabled=cfg.unclosed_policy == "drop")  # "keep" may turn it all into the answer
        outputs: asyncio.Queue = asyncio.Queue()
        task = asyncio.create_task(run_problem(self.engine, cfg, problem, _tag(), outputs.put_nowait, body.priority))
        task.add_done_callback(lambda _: outputs.put_nowait(None))
        head = {"id": new_id("chatcmpl"), "object": "chat.completion.chunk", "created": now(), "model": model}

        def chunk(delta: dict, finish: str | None = None) -> str:
            return sse({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

        yield chunk({"role": "assistant", "content": ""})  # at once: the earlier rounds can take a while
        try:
            while (out := await outputs.get()) is not None:
                if thought := live.delta(out.outputs[0].text):
                    yield chunk({"reasoning_content": thought})
            result = task.result()
        finally:
            task.cancel()  # a closed stream (client gone) aborts the round in flight; no-op when done
        try:
            _raise_if_failed(result)
        except RequestError as e:  # mid-stream: the same error as the non-streamed response, as an event
            error = error_body(str(e), e.kind, e.param, e.status)["error"]
            yield sse({"error": {**error, "pacore": result.to_dict()}})
        else:
            rest = result.final_reasoning_content
            rest = rest[len(live.sent):] if rest.startswith(live.sent) else ""
            yield chunk({"reasoning_content": rest, "content": result.final_response}, _choice(result).finish_reason)
            tail = {**head, "choices": [], "pacore": result.to_dict()}
            if body.include_usage:
                tail["usage"] = _usage(result).model_dump()
            yield sse(tail)
        yield sse("[DONE]")

    # -- batch route ----------------------------------------------------------------------------------

    async def _batch_route(self, body: PaCoReRequest, request: Request) -> Any:
        return await until_disconnected(request, self.batch(body))  # a client that leaves aborts the rounds

    async def batch(self, body: PaCoReRequest) -> dict:
        """Every problem in flight at once on the shared engine; the official result records, in input order."""
        cfg = self.config_for(body.preset, body.rounds, max_tokens=body.max_tokens,
                              message_max_tokens=body.message_max_tokens, temperature=body.temperature,
                              top_p=body.top_p, seed=body.seed, unclosed_policy=body.unclosed_policy,
                              record_reasoning=body.record_reasoning)
        if self.max_problems is not None and len(body.problems) > self.max_problems:
            raise RequestError(f"{len(body.problems)} problems are over this server's limit of {self.max_problems} "
                               f"per request (--max-pacore-problems); send them in several requests", "problems")
        try:
            problems = [as_problem(p, i) for i, p in enumerate(body.problems)]
            check_unique_ids(problems)
        except (ValueError, TypeError) as e:
            raise RequestError(str(e), "problems") from None
        problems = [dataclasses.replace(p, messages=await resolve_images(p.messages, self.server.config.media))
                    for p in problems]
        tag = _tag()
        results = await gather_or_cancel([run_problem(self.engine, cfg, p, tag) for p in problems])
        return {"object": "pacore.results", "data": [r.to_dict() for r in results]}


# Request fields a PaCoRe model cannot honour (its rounds sample with the method's own settings): refused, not
# silently ignored. temperature, top_p, max_tokens and seed are taken.
_PLAIN_ONLY = {"logprobs": False, "top_logprobs": None, "prompt_logprobs": None, "stop": None, "stop_token_ids": None,
               "top_k": None, "min_p": None, "min_tokens": 0, "logit_bias": None, "allowed_token_ids": None,
               "bad_words": None, "truncate_prompt_tokens": None, "presence_penalty": 0.0, "frequency_penalty": 0.0,
               "repetition_penalty": None, "ignore_eos": False, "structured_outputs": None, "guided_json": None,
               "guided_regex": None, "guided_choice": None, "guided_grammar": None, "tools": None,
               "use_beam_search": False, "length_penalty": 1.0}


def _refuse_plain_only(body: ChatCompletionRequest) -> None:
    for name, default in _PLAIN_ONLY.items():
        value = getattr(body, name)
        if value not in (None, default, [], {}):
            raise RequestError(f"{name} is not available from a PaCoRe model (its rounds sample with the method's "
                               f"settings; only temperature, top_p, max_tokens and seed apply)", name)
    if (body.response_format or {}).get("type", "text") != "text":
        raise RequestError("response_format is not available from a PaCoRe model", "response_format")


def _with_processors(processors: list):
    """A sampling_hook giving every round the server-wide logits processors."""
    def hook(problem_id: str, round_index: int, params):
        params.logits_processors = list(processors)
        return params
    return hook


def _tag() -> str:
    return f"pacore-{uuid.uuid4().hex[:12]}"


def _raise_if_failed(result: PaCoReResult) -> None:
    """A problem that never ran a round failed on its input: the client's error (400). One that failed later (no
    trajectory gave a message) is the method's failure: a 500 that still carries the record."""
    if result.error is None:
        return
    if not result.rounds:
        raise RequestError(result.error, "messages")
    raise PaCoReFailed(result)


class PaCoReFailed(RequestError):
    """No answer after the rounds ran (e.g. no trajectory closed its reasoning): the error carries the record."""

    def __init__(self, result: PaCoReResult):
        super().__init__(result.error, None, 500, "PaCoReError", {"pacore": result.to_dict()})


class _LiveReasoning:
    """The final round's reasoning up to its first </think> (a prefix of PaCoRe's reasoning, which ends at the
    last one), as deltas."""

    def __init__(self, enabled: bool):
        self.enabled, self.sent, self.closed = enabled, "", False

    def delta(self, text: str) -> str:
        if not self.enabled or self.closed:
            return ""
        reasoning, _ = split_reasoning(text)
        self.closed = THINK_END in text
        out, self.sent = reasoning[len(self.sent):], reasoning
        return out


def _choice(result: PaCoReResult) -> ChatChoice:
    final = result.round_responses[-1][0] if result.round_responses else {}
    finish = final.get("finish_reason") or "stop"
    return ChatChoice(index=0, message=ChatMessage(content=result.final_response,
                                                   reasoning_content=result.final_reasoning_content or None),
                      finish_reason=finish)


def _usage(result: PaCoReResult) -> Usage:
    return Usage.of(result.prompt_tokens, result.effective_ttc, result.prefix_hit_tokens)

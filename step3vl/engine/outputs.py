"""What the engine returns: vLLM's RequestOutput / CompletionOutput shapes."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from step3vl.engine.sequence import Request, Sequence


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None = None  # 'stop' | 'length' | 'abort'
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: dict = field(default_factory=dict)
    prompt_logprobs: list | None = None  # with SamplingParams.prompt_logprobs: None, then {token: logprob} per token


def visible_text(seq: Sequence) -> str:
    """While running, hold back a tail that could still become a stop string (vLLM does the same), so
    streamed text only ever grows."""
    stops = seq.request.params.stop_strings
    hold = max(map(len, stops)) - 1 if stops and seq.finish_reason is None else 0
    return seq.text[:len(seq.text) - hold] if hold else seq.text


def request_metrics(req: Request, comps: list[CompletionOutput]) -> dict:
    """Seconds, vLLM's request metrics: time to first token, time in the queue, end to end (once finished), and the
    mean interval between a sample's output tokens (the request's longest sample)."""
    if req.finished and req.finished_time is None:
        req.finished_time = time.perf_counter()
    since = lambda t: None if t is None else t - req.arrival_time  # noqa: E731
    tokens = max((len(c.token_ids) for c in comps), default=0)
    itl = None
    if req.finished_time is not None and req.first_token_time is not None and tokens > 1:
        itl = (req.finished_time - req.first_token_time) / (tokens - 1)
    return {"time_to_first_token": since(req.first_token_time), "queue_time": since(req.scheduled_time),
            "e2e_latency": since(req.finished_time), "inter_token_latency": itl, "output_tokens": tokens}


def request_output(req: Request) -> RequestOutput:
    """A request's output so far, its completions in index order."""
    comps = [CompletionOutput(
        index=s.index, text=visible_text(s), token_ids=s.output_ids,
        cumulative_logprob=s.cumulative_logprob if req.params.logprobs is not None else None,
        logprobs=list(s.logprobs) if req.params.logprobs is not None else None,
        finish_reason=s.finish_reason, stop_reason=s.stop_reason) for s in sorted(req.sequences, key=lambda s: s.index)]
    return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, comps, req.finished,
                         num_cached_tokens=req.num_cached_tokens, metrics=request_metrics(req, comps),
                         prompt_logprobs=list(req.prompt_logprobs) if req.prompt_logprobs is not None else None)

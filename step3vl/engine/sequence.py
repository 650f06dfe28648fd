"""Requests and their sequences (one per sample), as the scheduler sees them."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from step3vl.engine.sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"  # no KV blocks; (re)computes its tokens when admitted
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One sample of a request. `token_ids` = prompt + output so far; KV exists for the first `num_computed`."""

    seq_id: int
    request: "Request"
    index: int
    token_ids: list[int]
    status: SeqStatus = SeqStatus.WAITING
    num_computed: int = 0
    num_registered: int = 0  # tokens the block manager holds slots for
    block_table: list[int] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    logprobs: list[dict[int, float]] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    detokenizer: Any = None
    num_preemptions: int = 0
    guide: Any = None  # structured outputs: this sample's grammar matcher (engine/structured_outputs.py)
    rule_state: dict = field(default_factory=dict)  # the sampler's per-sample incremental state (penalties)
    draft: list[int] = field(default_factory=list)  # speculative tokens proposed for this step (speculative.py)
    draft_state: Any = None  # the proposer's per-sample state

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def cache_token_ids(self) -> list[int]:
        """`token_ids` as the prefix cache hashes them: the prompt's image rows carry their image's digest."""
        cached = self.request.cache_prompt_ids
        return self.token_ids if cached is None else cached + self.output_ids

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def is_decode(self) -> bool:
        """All KV is computed but the newest sampled token's, which has no slot yet: one token this step.

        (A recomputed sequence whose prefill chunk stops one token short is not a decode: that token already
        has its slot from `allocate`.)"""
        return self.num_computed == self.num_registered == self.num_tokens - 1

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int
    arrival: int
    priority: int = 0  # scheduling_policy='priority': lower values are scheduled first (vLLM's convention)
    images: list[Any] = field(default_factory=list)  # per image: .global_view, .crops
    salt: int = 0  # prefix-cache salt (cache_salt): requests with other salts never share cached blocks
    sequences: list[Sequence] = field(default_factory=list)
    image_layout: Any = None  # image_inputs.RequestImages: image spans and features not yet in the cache
    cache_prompt_ids: list[int] | None = None  # the prompt as the prefix cache hashes it, when it has images
    leader: "Request | None" = None  # an identical prompt being prefilled; we fork from it when done
    followers: list["Request"] = field(default_factory=list)
    forked: bool = False  # all n samples exist
    aborted: bool = False
    num_cached_tokens: int = 0
    first_token_time: float | None = None
    arrival_time: float = 0.0
    scheduled_time: float | None = None  # when its prompt was first computed (the end of its time in the queue)
    finished_time: float | None = None
    grammar: Any = None  # structured outputs: the compiled grammar every sample follows
    bad_words_ids: list[list[int]] = field(default_factory=list)  # SamplingParams.bad_words, tokenized
    prompt_logprobs: list | None = None  # per prompt position: None (the first) or {token: logprob}
    rule_cache: dict = field(default_factory=dict)  # the sampler's per-request tensors (masks, prompt ids)

    @property
    def finished(self) -> bool:
        return self.forked and all(s.finished for s in self.sequences)

    @property
    def prompt_key(self) -> tuple:
        return (self.salt, tuple(self.cache_prompt_ids or self.prompt_token_ids))

"""Beam search (vLLM's `LLM.beam_search`), driven on the engine one token per step.

Each step asks the engine for one greedy token of every live beam with its 2·beam_width most likely alternatives
(log-probs of the model's own distribution); every (beam, alternative) pair is a candidate scored by cumulative
log-prob, and each prompt keeps its beam_width best. A candidate ending in EOS (unless ignore_eos) is set aside
as finished. After max_tokens steps the finished and live beams are ranked by cum_logprob / len^length_penalty,
len counting the prompt and not a final EOS (vLLM's `get_beam_search_score`). The beams of one prompt share its
prefix in the KV pool through the prefix cache, so a step computes only each beam's last, partial block.

`BeamSearch` holds the beams between steps and knows no engine; `run_beam_search` drives it on anything with
`BeamSearchEngine`'s methods (`LLM`); AsyncLLM drives it with its own coroutines.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from step3vl.engine.outputs import RequestOutput
from step3vl.engine.prompts import PreparedPrompt, prompt_list
from step3vl.engine.sampling_params import SamplingParams


@dataclass
class BeamSearchParams:
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0  # of the engine's draw per beam; the candidates are the top log-probs either way
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        for name in ("beam_width", "max_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"BeamSearchParams.{name} = {v!r}: must be an int >= 1")
        if not (isinstance(self.length_penalty, (int, float)) and math.isfinite(self.length_penalty)):
            raise ValueError(f"BeamSearchParams.length_penalty = {self.length_penalty!r}: must be a finite number")
        if not 0.0 <= self.temperature < float("inf"):
            raise ValueError(f"BeamSearchParams.temperature = {self.temperature!r}: must be a finite number >= 0")


@dataclass
class BeamSearchSequence:
    tokens: list[int]  # prompt + output, as in vLLM
    logprobs: list[dict[int, float]]  # per output token: its step's candidates {token: logprob}
    cum_logprob: float = 0.0
    num_prompt_tokens: int = 0
    text: str | None = None  # vLLM's: prompt and output decoded together
    output_text: str | None = None  # the output alone (special tokens skipped; a final EOS only with
    # include_stop_str_in_output)
    finish_reason: str | None = None  # "stop" (EOS) or "length"

    @property
    def output_token_ids(self) -> list[int]:
        return self.tokens[self.num_prompt_tokens:]


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence] = field(default_factory=list)  # best first


def beam_score(seq: BeamSearchSequence, eos_ids: set[int], length_penalty: float) -> float:
    n = len(seq.tokens) - (1 if seq.finish_reason == "stop" and seq.tokens[-1] in eos_ids else 0)
    return seq.cum_logprob / (n ** length_penalty)


class BeamSearch:
    """The beams of a batch of prompts between steps; a driver runs each step's `requests()` on an engine (LLM or
    AsyncLLM) with `step_params` and hands the outputs to `advance`."""

    def __init__(self, prepared: list[PreparedPrompt], params: BeamSearchParams, eos_ids: set[int],
                 max_logprobs: int, max_model_len: int):
        if 2 * params.beam_width > max_logprobs:
            raise ValueError(f"BeamSearchParams.beam_width = {params.beam_width}: each step asks for 2 x beam_width "
                             f"log-probs, over max_logprobs {max_logprobs} (LLM(max_logprobs=...) raises it)")
        for i, p in enumerate(prepared):
            if len(p.token_ids) + params.max_tokens > max_model_len:
                raise ValueError(f"prompt {i}: {len(p.token_ids)} tokens + max_tokens {params.max_tokens} do not "
                                 f"fit max_model_len {max_model_len}")
        self.prepared, self.params, self.eos_ids = prepared, params, eos_ids
        self.step_params = SamplingParams(temperature=params.temperature, max_tokens=1,
                                          logprobs=2 * params.beam_width, ignore_eos=True)
        self.live = [[BeamSearchSequence(list(p.token_ids), [], 0.0, len(p.token_ids))] for p in prepared]
        self.done: list[list[BeamSearchSequence]] = [[] for _ in prepared]
        self.steps = 0
        self._flat: list[tuple[int, BeamSearchSequence]] = []

    @property
    def finished(self) -> bool:
        return self.steps >= self.params.max_tokens or not any(self.live)

    def requests(self) -> list[PreparedPrompt]:
        self._flat = [(i, b) for i, beams in enumerate(self.live) for b in beams]
        return [_extend(self.prepared[i], b.tokens) for i, b in self._flat]

    def advance(self, outs: list) -> None:
        candidates: list[list[BeamSearchSequence]] = [[] for _ in self.prepared]
        for (i, beam), out in zip(self._flat, outs, strict=True):
            top = out.outputs[0].logprobs[0]
            for token, lp in top.items():
                seq = BeamSearchSequence(beam.tokens + [token], beam.logprobs + [top],
                                         beam.cum_logprob + lp, beam.num_prompt_tokens)
                if token in self.eos_ids and not self.params.ignore_eos:
                    seq.finish_reason = "stop"
                    self.done[i].append(seq)
                else:
                    candidates[i].append(seq)
        self.live = [sorted(c, key=lambda s: s.cum_logprob, reverse=True)[:self.params.beam_width]
                     for c in candidates]
        self.steps += 1

    def results(self, tokenizer) -> list[BeamSearchOutput]:
        out = []
        for live, done in zip(self.live, self.done):
            for seq in live:
                seq.finish_reason = "length"
            ranked = sorted(done + live, key=lambda s: beam_score(s, self.eos_ids, self.params.length_penalty),
                            reverse=True)[:self.params.beam_width]
            for seq in ranked:
                ids = seq.output_token_ids
                if seq.finish_reason == "stop" and not self.params.include_stop_str_in_output:
                    ids = ids[:-1]
                seq.text = tokenizer.decode(seq.tokens)
                seq.output_text = tokenizer.decode(ids, skip_special_tokens=not self.params.include_stop_str_in_output)
            out.append(BeamSearchOutput(ranked))
        return out


def _extend(prompt: PreparedPrompt, tokens: list[int]) -> PreparedPrompt:
    """The prompt continued by a beam's tokens, with the prompt's images (encoded once: the encoder cache)."""
    return replace(prompt, token_ids=tokens)


class BeamSearchEngine(Protocol):
    """What `run_beam_search` needs of an engine: `LLM` has it."""

    def prepare(self, prompt: Any) -> PreparedPrompt: ...

    def new_beam_search(self, prepared: list[PreparedPrompt], params: BeamSearchParams) -> BeamSearch: ...

    def generate(self, prompts: Any, sampling_params: SamplingParams, use_tqdm: bool) -> list[RequestOutput]: ...

    def get_tokenizer(self) -> Any: ...


def run_beam_search(engine: BeamSearchEngine, prompts: Any, params: BeamSearchParams,
                    use_tqdm: bool = False) -> list[BeamSearchOutput]:
    """`LLM.beam_search`: every step's beams of all prompts as one batch on the engine."""
    search = engine.new_beam_search([engine.prepare(p) for p in prompt_list(prompts)], params)
    while not search.finished:
        search.advance(engine.generate(search.requests(), search.step_params, use_tqdm=use_tqdm))
    return search.results(engine.get_tokenizer())

"""Fixtures for the PaCoRe tests: a tiny checkpoint, fresh engines, and scripted trajectories.

A scripted logits processor makes the (random-weight) model write known text: every position but the first
is forced, and the first token is sampled (with the request's seed) among a few letters, so the samples of
one request differ and each sample's whole text follows from its first token.
"""

from __future__ import annotations

import pytest
import torch

from step3vl.tools.make_tiny_checkpoint import make_tiny_checkpoint

CHOICES = ("A", "B", "C", "D")


@pytest.fixture(autouse=True, scope="module")
def _tiny_shapes_one_thread(one_torch_thread):
    pass


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("pacore") / "tiny", "tiny")


@pytest.fixture
def make_llm(tiny_dir):
    from step3vl.engine.llm import LLM

    def make(**kw):
        kw.setdefault("kv_cache_memory", "8MiB")
        return LLM(tiny_dir, **kw)
    return make


@pytest.fixture
def tokenizer(tiny_dir):
    from step3vl.processor import Step3VLTokenizer
    return Step3VLTokenizer.from_pretrained(tiny_dir)


class Script:
    """Trajectory text = <letter> + reasoning + </think> + answer(letter) [+ eos]."""

    def __init__(self, tok, reasoning: str = " thinking", answer=lambda c: f" The answer is {c}.",
                 think_at: int | None = None, close: bool = True, eos: bool = True, choices=CHOICES):
        self.tok = tok
        self.choice_ids = [tok.token_to_id(c) for c in choices]
        self.reasoning, self.answer = reasoning, answer
        self.think_at, self.close, self.eos = think_at, close, eos

    def letter(self, first_id: int) -> str:
        return self.tok.decode([first_id])

    def tokens(self, first_id: int) -> list[int]:
        c = self.letter(first_id)
        ids = [first_id] + self.tok.encode(self.reasoning)
        if self.think_at is not None:  # pad the reasoning with "x" up to the position of </think>
            ids += [self.tok.token_to_id("x")] * max(0, self.think_at - len(ids))
        if self.close:
            ids += [self.tok.think_end_id] + self.tok.encode(self.answer(c))
        if self.eos:
            ids.append(self.tok.eos_token_id)
        return ids

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        allowed = self.choice_ids if not output_ids else [self._next(output_ids)]
        masked = torch.full_like(logits, float("-inf"))
        masked[allowed] = logits[allowed]
        return masked

    def _next(self, output_ids: list[int]) -> int:
        ids = self.tokens(output_ids[0])
        p = len(output_ids)
        return ids[p] if p < len(ids) else self.tok.token_to_id("y")  # past the script: filler


@pytest.fixture
def script(tokenizer):
    def make(**kw) -> Script:
        return Script(tokenizer, **kw)
    return make


def hook_with(processors_by_problem: dict):
    """A sampling_hook that installs per-problem (and optionally per-round) logits processors.

    processors_by_problem: problem id -> processor, or -> {round index: processor}; "*" is the default.
    """
    def hook(pid, r, params):
        spec = processors_by_problem.get(pid, processors_by_problem.get("*"))
        if isinstance(spec, dict):
            spec = spec.get(r, spec.get("*"))
        if spec is not None:
            params.logits_processors = [spec]
        return params
    return hook


@pytest.fixture
def hook():
    return hook_with

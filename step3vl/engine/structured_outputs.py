"""Structured outputs (vLLM's guided decoding): a JSON schema, any JSON object, a regex, a choice of strings or
an EBNF grammar, enforced token by token with xgrammar.

A request's grammar is compiled once when it is added (a bad schema fails the request then, naming the field);
each sample keeps its own matcher on its `Sequence`, created when it first samples, so forked samples, preempted
and recomputed samples all follow their own output. Before sampling, each guided row's matcher catches up with
the tokens the sample has accepted so far and masks every token the grammar forbids next; once the grammar is
complete only the stop tokens (EOS) remain.

`after_token` (e.g. `</think>`'s id) lets a reasoning model think freely: the grammar applies to what follows the
first occurrence of that token in the output, and nothing is enforced before it (vLLM does the same with a
reasoning parser). A prompt that already holds the token (a template that closes the reasoning itself) starts
enforcing at once.

A sample whose grammar has completed is left alone (with ignore_eos it may go on, unconstrained); one whose
grammar rejects its own token (only possible when other rules leave no allowed token) is reported to the
sampler, which ends that sample instead of the engine.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class StructuredOutputs:
    """Exactly one of: json (a JSON schema, dict or string), json_object, regex, choice, grammar (EBNF)."""
    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    after_token: int | None = None  # enforce only after this token appears in the output

    def __post_init__(self) -> None:
        if isinstance(self.choice, str):
            raise ValueError("SamplingParams.structured_outputs: choice must be a list of strings, not one string")
        if self.after_token is not None and (not isinstance(self.after_token, int) or self.after_token < 0):
            raise ValueError(f"SamplingParams.structured_outputs: after_token must be a token id (int >= 0), got "
                             f"{self.after_token!r}")
        given = [n for n in ("json", "regex", "choice", "grammar") if getattr(self, n) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError(f"SamplingParams.structured_outputs: give exactly one of json, json_object, regex, "
                             f"choice, grammar (got {given or 'none'})")
        if self.choice is not None:
            if not self.choice or any(not isinstance(c, str) or not c for c in self.choice):
                raise ValueError("SamplingParams.structured_outputs: choice must be a non-empty list of non-empty "
                                 "strings")
            object.__setattr__(self, "choice", tuple(self.choice))

    def key(self) -> str:
        """A stable cache key (a dict schema hashed by its JSON)."""
        value = self.json if not isinstance(self.json, dict) else json.dumps(self.json, sort_keys=True)
        return json.dumps([value, self.json_object, self.regex, self.choice, self.grammar])


class _Guide:
    """One sample's matcher and how many of its output tokens the matcher has accepted."""

    def __init__(self, matcher):
        self.matcher = matcher
        self.accepted = 0
        self.broken = False  # the matcher rejected one of the sample's tokens


class StructuredOutputBackend:
    """Compiles grammars against one tokenizer (an LRU cache by spec) and masks logits rows of guided sequences.
    `compile` may run on any thread (a server compiles on workers so the engine thread only finds it cached)."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: set[int], cache_size: int = 256):
        self._tokenizer, self._vocab, self._eos = tokenizer, vocab_size, sorted(eos_token_ids)
        self._compiler = None
        self._cache: OrderedDict[str, object] = OrderedDict()
        self._cache_size = cache_size

    def compile(self, spec: StructuredOutputs):
        """The compiled grammar of a spec; ValueError naming the field when xgrammar rejects it."""
        if spec.after_token is not None and spec.after_token >= self._vocab:
            raise ValueError(f"SamplingParams.structured_outputs: after_token {spec.after_token} is outside the "
                             f"vocabulary [0, {self._vocab})")
        key = spec.key()
        grammar = self._cache.get(key)
        if grammar is None:
            try:
                grammar = self._compile(spec)
            except (RuntimeError, ValueError, TypeError) as e:
                raise ValueError(f"SamplingParams.structured_outputs: {_first_line(e)}") from None
            self._cache[key] = grammar
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return grammar

    def _compile(self, spec: StructuredOutputs):
        c = self._get_compiler()
        if spec.json is not None:
            return c.compile_json_schema(spec.json)
        if spec.json_object:  # OpenAI's json_object mode: an object, not any JSON value
            return c.compile_json_schema({"type": "object"})
        if spec.regex is not None:
            return c.compile_regex(spec.regex)
        if spec.choice is not None:
            alternatives = " | ".join(json.dumps(s, ensure_ascii=False) for s in spec.choice)
            return c.compile_grammar(f"root ::= {alternatives}")
        return c.compile_grammar(spec.grammar)

    def _get_compiler(self):
        if self._compiler is None:
            try:
                import xgrammar as xgr
            except ImportError:
                raise ValueError("structured outputs need xgrammar, which is not installed: "
                                 "pip install 'step3vl[structured]'") from None
            from transformers import PreTrainedTokenizerFast

            hf = PreTrainedTokenizerFast(tokenizer_object=self._tokenizer.tok)
            info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=self._vocab, stop_token_ids=self._eos)
            self._compiler = xgr.GrammarCompiler(info)
        return self._compiler

    def mask(self, logits: torch.Tensor, seqs: list) -> tuple[torch.Tensor, list[int]]:
        """(logits [B, V] with every guided row's forbidden tokens at -inf, the rows whose grammar broke)."""
        import xgrammar as xgr

        rows = [i for i, s in enumerate(seqs) if s.request.grammar is not None]
        if not rows:
            return logits, []
        bitmask = xgr.allocate_token_bitmask(len(rows), self._vocab)
        masked, broken = [], []
        for j, i in enumerate(rows):
            guide = self._guide(seqs[i])
            if guide is not None and guide.broken:
                broken.append(i)
            elif guide is not None and not guide.matcher.is_terminated():
                guide.matcher.fill_next_token_bitmask(bitmask, j)
                masked.append((j, i))
        if not masked:
            return logits, broken
        out = logits.clone()
        idx = torch.tensor([i for _, i in masked])
        sub = out[idx].float()
        xgr.apply_token_bitmask_inplace(sub, bitmask[[j for j, _ in masked]].to(sub.device))
        out[idx] = sub.to(out.dtype)
        return out, broken

    def _guide(self, seq) -> _Guide | None:
        """The sample's matcher, caught up with its output; None while the output has not reached `after_token`."""
        import xgrammar as xgr

        out = seq.output_ids
        after = seq.request.params.structured_outputs.after_token
        if after is not None and after not in seq.request.prompt_token_ids:
            if after not in out:
                return None
            out = out[out.index(after) + 1:]
        if seq.guide is None:
            seq.guide = _Guide(xgr.GrammarMatcher(seq.request.grammar))
        guide = seq.guide
        for t in out[guide.accepted:]:
            if guide.broken or guide.matcher.is_terminated():
                break  # complete (ignore_eos goes on unconstrained) or already broken
            guide.broken = not guide.matcher.accept_token(t)
        guide.accepted = len(out)
        return guide


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]

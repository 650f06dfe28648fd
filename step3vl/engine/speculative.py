"""Speculative decoding with n-gram prompt lookup (vLLM's `speculative_config={"method": "ngram", ...}`).

Each step, a decoding sample whose context ends in an n-gram that occurred earlier (in its prompt or its own
output) proposes the k tokens that followed that occurrence. The engine runs the sample's last token and the k
drafts as one chunk (causal attention over the paged context, like a prefill chunk), samples every position
with the sample's own counter-based randomness, and keeps the drafts up to the first one that differs from what
was sampled there, plus that sampled token. A position's draw is the one the sample would make without
speculation, so outputs are identical with and without it, token for token, for greedy and seeded sampling
alike; speculation only changes how many tokens a step yields. PaCoRe's synthesis rounds, which quote the
reference messages in their prompt, are where it pays. On the native CPU path a step of decodes and verify chunks
is still one decode-stack call, a row per chunk token (engine/model_runner.py).

Requests whose sampling depends on the tokens before each position beyond the model's logits (logits
processors, penalties, structured outputs, min_tokens / logit_bias / allowed_token_ids) decode one token at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from step3vl.engine.penalties import has_penalties
from step3vl.engine.sampling_params import SamplingParams
from step3vl.engine.sequence import Sequence
from step3vl.engine.token_constraints import has_constraints


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str = "ngram"
    num_speculative_tokens: int = 4  # k: drafts per step
    prompt_lookup_max: int = 4  # the longest n-gram to match
    prompt_lookup_min: int = 2  # the shortest n-gram that counts as a match
    # No drafts in a step where this many samples or more decode (None: always draft). A large batch already
    # fills the device, and on the CPU a step with a verify chunk leaves the one-call decode stack.
    disable_by_batch_size: int | None = None

    def __post_init__(self) -> None:
        for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min", "disable_by_batch_size"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool)) and not (
                    name == "disable_by_batch_size" and value is None):
                raise ValueError(f"speculative_config.{name} must be an integer, got {value!r}")
        if self.method != "ngram":
            raise ValueError(f"speculative_config.method {self.method!r}: only 'ngram' (prompt lookup) is built in")
        if self.num_speculative_tokens < 1:
            raise ValueError(f"speculative_config.num_speculative_tokens must be >= 1, got {self.num_speculative_tokens}")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError(f"speculative_config: need 1 <= prompt_lookup_min ({self.prompt_lookup_min}) <= "
                             f"prompt_lookup_max ({self.prompt_lookup_max})")
        if self.disable_by_batch_size is not None and self.disable_by_batch_size < 2:
            raise ValueError(f"speculative_config.disable_by_batch_size must be >= 2 (or None), "
                             f"got {self.disable_by_batch_size}")

    @classmethod
    def of(cls, value: "SpeculativeConfig | dict | None") -> "SpeculativeConfig | None":
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        unknown = set(value) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"speculative_config: unknown key(s) {sorted(unknown)}; "
                             f"known: {sorted(cls.__dataclass_fields__)}")
        return cls(**value)


def can_speculate(params: SamplingParams) -> bool:
    """Sampling that depends only on the logits and the position (not on earlier tokens) can verify drafts."""
    return not (params.logits_processors or params.structured_outputs is not None or has_penalties(params)
                or has_constraints(params))


def ngram_draft(tokens: np.ndarray, k: int, n_min: int, n_max: int) -> list[int]:
    """The k tokens that followed the latest earlier occurrence of the longest suffix n-gram (n_min <= n <= n_max)
    of `tokens`; [] when there is none."""
    length = len(tokens)
    if k < 1 or length < n_min + 1:
        return []
    cand = np.flatnonzero(tokens[:length - 1] == tokens[length - 1])  # p: earlier positions of the last token
    best, m = None, 1  # cand holds the p whose preceding m tokens match the suffix
    while cand.size:
        if m >= n_min:
            best = cand
        if m == n_max:
            break
        cand = cand[cand >= m]
        cand = cand[tokens[cand - m] == tokens[length - 1 - m]]
        m += 1
    if best is None:
        return []
    p = int(best[-1])
    return tokens[p + 1:p + 1 + k].tolist()


class TokenHistory:
    """A sample's tokens as a growing numpy array (appended incrementally, not rebuilt every step)."""

    def __init__(self):
        self.buf, self.n = np.empty(256, dtype=np.int64), 0

    def sync(self, tokens: list[int]) -> np.ndarray:
        if len(tokens) < self.n:
            self.n = 0
        new = tokens[self.n:]
        if self.n + len(new) > len(self.buf):
            grown = np.empty(max(2 * len(self.buf), self.n + len(new)), dtype=np.int64)
            grown[:self.n] = self.buf[:self.n]
            self.buf = grown
        self.buf[self.n:self.n + len(new)] = new
        self.n += len(new)
        return self.buf[:self.n]


class NgramProposer:
    def __init__(self, config: SpeculativeConfig, max_model_len: int):
        self.config, self.max_model_len = config, max_model_len

    def propose(self, decoding: list[Sequence]) -> None:
        """Set `seq.draft` for each sample about to decode (an empty draft: one token as usual)."""
        cfg = self.config
        for seq in decoding:
            seq.draft = []
        if cfg.disable_by_batch_size is not None and len(decoding) >= cfg.disable_by_batch_size:
            return
        for seq in decoding:
            p = seq.request.params
            room = min(cfg.num_speculative_tokens, self.max_model_len - seq.num_tokens - 1)
            if p.max_tokens is not None:  # the step yields up to len(draft) + 1 tokens
                room = min(room, p.max_tokens - len(seq.output_ids) - 1)
            if room < 1 or not can_speculate(p):
                continue
            if seq.draft_state is None:
                seq.draft_state = TokenHistory()
            seq.draft = ngram_draft(seq.draft_state.sync(seq.token_ids), room, cfg.prompt_lookup_min,
                                    cfg.prompt_lookup_max)

"""Repetition, frequency and presence penalties (vLLM's / OpenAI's definitions), applied to logits before
sampling:

- repetition_penalty r (1 = off): every token seen in the prompt or the output so far has its logit divided by r
  when positive and multiplied by r when negative (CTRL's rule);
- frequency_penalty f (0 = off): logit -= f × (times the token occurs in the output);
- presence_penalty p (0 = off): logit -= p × (1 if the token occurs in the output).

Repetition first, then frequency and presence. They read only the sequence's own tokens, so a sample's draws still
do not depend on what else is in the batch.

Per step the cost is a gather/scatter over the distinct tokens seen, with no Python work over the prompt or the
whole output: the prompt's distinct ids are kept per request (on the logits' device), and each sample keeps its
distinct output ids and their counts as device tensors that grow only by the tokens added since the last step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def has_penalties(params) -> bool:
    return params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0 or params.presence_penalty != 0.0


@dataclass
class _OutputCounts:
    """One sample's distinct output ids with their counts (and which of them the prompt lacks), kept as device
    tensors that grow with the output."""
    device: torch.device
    counted: int = 0
    slot: dict[int, int] = field(default_factory=dict)  # token -> its index in ids / counts
    ids: torch.Tensor | None = None  # [distinct] int64
    counts: torch.Tensor | None = None  # [distinct] float32
    new_ids: torch.Tensor | None = None  # [distinct not in the prompt] int64

    def add(self, tokens: list[int], prompt_set: set[int]) -> None:
        fresh = []
        for t in tokens:
            if t not in self.slot:
                self.slot[t] = len(self.slot)
                fresh.append(t)
        grow = torch.tensor(fresh, dtype=torch.int64, device=self.device)
        self.ids = grow if self.ids is None else torch.cat([self.ids, grow])
        self.counts = torch.cat([self.counts if self.counts is not None else grow.new_zeros(0, dtype=torch.float32),
                                 grow.new_zeros(len(fresh), dtype=torch.float32)])
        self.counts.index_add_(0, torch.tensor([self.slot[t] for t in tokens], device=self.device),
                               torch.ones(len(tokens), device=self.device))
        outside = torch.tensor([t for t in fresh if t not in prompt_set], dtype=torch.int64, device=self.device)
        self.new_ids = outside if self.new_ids is None else torch.cat([self.new_ids, outside])


def apply_penalties(logits: torch.Tensor, seqs: list) -> torch.Tensor:
    """logits [B, V] (row i for seqs[i]) → penalized logits (a new tensor; rows without penalties unchanged)."""
    rows = [i for i, s in enumerate(seqs) if has_penalties(s.request.params)]
    if not rows:
        return logits
    out, vocab = logits.clone(), logits.shape[1]
    for i in rows:
        seq, row = seqs[i], out[i]
        p = seq.request.params
        prompt_set, prompt_ids = _prompt_ids(seq.request, vocab, row.device)
        st = _counts(seq, prompt_set, vocab, row.device)
        if p.repetition_penalty != 1.0:
            seen = prompt_ids if st.new_ids is None else torch.cat([prompt_ids, st.new_ids])
            vals = row[seen].float()
            row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty).to(row.dtype)
        if st.ids is not None and len(st.ids) and (p.frequency_penalty or p.presence_penalty):
            row[st.ids] -= (p.frequency_penalty * st.counts + p.presence_penalty).to(row.dtype)
    return out


def _prompt_ids(req, vocab: int, device: torch.device) -> tuple[set[int], torch.Tensor]:
    """The prompt's distinct in-vocabulary ids, as a set and a tensor on `device` (computed once per request)."""
    key = ("penalty_prompt", device)
    if key not in req.rule_cache:
        ids = {t for t in req.prompt_token_ids if 0 <= t < vocab}
        req.rule_cache[key] = (ids, torch.tensor(sorted(ids), dtype=torch.int64, device=device))
    return req.rule_cache[key]


def _counts(seq, prompt_set: set[int], vocab: int, device: torch.device) -> _OutputCounts:
    st = seq.rule_state.setdefault("penalty_counts", _OutputCounts(device))
    out = seq.output_ids
    new = [t for t in out[st.counted:] if 0 <= t < vocab]
    if new:
        st.add(new, prompt_set)
    st.counted = len(out)
    return st


def apply_penalties_ref(logits_row: list[float], prompt: list[int], output: list[int], repetition: float,
                        frequency: float, presence: float) -> list[float]:
    """One row, in plain Python: the definition the batched version is tested against."""
    row = list(logits_row)
    for t in set(prompt) | set(output):
        row[t] = row[t] / repetition if row[t] > 0 else row[t] * repetition
    for t in set(output):
        row[t] -= frequency * output.count(t) + presence
    return row

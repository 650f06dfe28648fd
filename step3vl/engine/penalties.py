"""Repetition, frequency and presence penalties (vLLM's / OpenAI's definitions), applied to logits before
sampling:

- repetition_penalty r (1 = off): every token seen in the prompt or the output so far has its logit divided by r
  when positive and multiplied by r when negative (CTRL's rule);
- frequency_penalty f (0 = off): logit -= f × (times the token occurs in the output);
- presence_penalty p (0 = off): logit -= p × (1 if the token occurs in the output).

Repetition first, then frequency and presence. They read only the sequence's own tokens, so a sample's draws still
do not depend on what else is in the batch.

Per step the cost is O(distinct tokens seen), never O(prompt) or O(vocab) again: the prompt's distinct ids are
kept per request, each sample's output counts grow by the tokens added since the last step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def has_penalties(params) -> bool:
    return params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0 or params.presence_penalty != 0.0


@dataclass
class _OutputCounts:
    """One sample's output token counts, and its distinct output ids that are not in the prompt."""
    counted: int = 0
    counts: dict[int, int] = field(default_factory=dict)
    new_ids: list[int] = field(default_factory=list)


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
        st = _counts(seq, prompt_set, vocab)
        if p.repetition_penalty != 1.0:
            seen = torch.cat([prompt_ids, torch.tensor(st.new_ids, dtype=torch.int64, device=row.device)])
            vals = row[seen].float()
            row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty).to(row.dtype)
        if st.counts and (p.frequency_penalty or p.presence_penalty):
            ids = torch.tensor(list(st.counts), dtype=torch.int64, device=row.device)
            n = torch.tensor(list(st.counts.values()), dtype=torch.float32, device=row.device)
            row[ids] -= (p.frequency_penalty * n + p.presence_penalty).to(row.dtype)
    return out


def _prompt_ids(req, vocab: int, device: torch.device) -> tuple[set[int], torch.Tensor]:
    """The prompt's distinct in-vocabulary ids, as a set and a tensor on `device` (computed once per request)."""
    key = ("penalty_prompt", device)
    if key not in req.rule_cache:
        ids = {t for t in req.prompt_token_ids if 0 <= t < vocab}
        req.rule_cache[key] = (ids, torch.tensor(sorted(ids), dtype=torch.int64, device=device))
    return req.rule_cache[key]


def _counts(seq, prompt_set: set[int], vocab: int) -> _OutputCounts:
    st = seq.rule_state.setdefault("penalty_counts", _OutputCounts())
    out = seq.output_ids
    for t in out[st.counted:]:
        if 0 <= t < vocab:
            if t not in st.counts and t not in prompt_set:
                st.new_ids.append(t)
            st.counts[t] = st.counts.get(t, 0) + 1
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

"""Repetition, frequency and presence penalties (vLLM's / OpenAI's definitions), applied to logits before
sampling:

- repetition_penalty r (1 = off): every token seen in the prompt or the output so far has its logit divided by r
  when positive and multiplied by r when negative (CTRL's rule);
- frequency_penalty f (0 = off): logit -= f × (times the token occurs in the output);
- presence_penalty p (0 = off): logit -= p × (1 if the token occurs in the output).

Repetition first, then frequency and presence. They read only the sequence's own tokens, so a sample's draws still
do not depend on what else is in the batch.
"""

from __future__ import annotations

import torch


def has_penalties(params) -> bool:
    return params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0 or params.presence_penalty != 0.0


def apply_penalties(logits: torch.Tensor, prompts: list[list[int]], outputs: list[list[int]], params: list) -> torch.Tensor:
    """logits [B, V] (one row per sequence) → penalized logits (a new tensor; rows without penalties unchanged).
    Touches only each row's distinct seen tokens: O(tokens) per row, not O(vocab)."""
    rows = [i for i, p in enumerate(params) if has_penalties(p)]
    if not rows:
        return logits
    out, vocab = logits.clone(), logits.shape[1]
    for i in rows:
        p, row = params[i], out[i]
        if p.repetition_penalty != 1.0:
            seen = _ids(set(prompts[i]).union(outputs[i]), vocab, row.device)
            vals = row[seen].float()
            row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty).to(row.dtype)
        if outputs[i] and (p.frequency_penalty or p.presence_penalty):
            ids, counts = torch.unique(_ids(outputs[i], vocab, row.device), return_counts=True)
            row[ids] -= (p.frequency_penalty * counts.float() + p.presence_penalty).to(row.dtype)
    return out


def _ids(tokens, vocab: int, device: torch.device) -> torch.Tensor:
    """The ids inside the vocabulary, as an int64 tensor."""
    return torch.tensor([t for t in tokens if 0 <= t < vocab], dtype=torch.int64, device=device)


def apply_penalties_ref(logits_row: list[float], prompt: list[int], output: list[int], repetition: float,
                        frequency: float, presence: float) -> list[float]:
    """One row, in plain Python: the definition the batched version is tested against."""
    row = list(logits_row)
    for t in set(prompt) | set(output):
        row[t] = row[t] / repetition if row[t] > 0 else row[t] * repetition
    for t in set(output):
        row[t] -= frequency * output.count(t) + presence
    return row

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
    """logits [B, V] (one row per sequence) → penalized logits (a new tensor; rows without penalties unchanged)."""
    rows = [i for i, p in enumerate(params) if has_penalties(p)]
    if not rows:
        return logits
    dev, vocab = logits.device, logits.shape[1]
    out = logits.clone()
    sub = out[rows].float()
    counts = _counts([outputs[i] for i in rows], vocab, dev)
    seen = (counts > 0) | (_counts([prompts[i] for i in rows], vocab, dev) > 0)
    rep = torch.tensor([params[i].repetition_penalty for i in rows], dtype=torch.float32, device=dev)[:, None]
    freq = torch.tensor([params[i].frequency_penalty for i in rows], dtype=torch.float32, device=dev)[:, None]
    pres = torch.tensor([params[i].presence_penalty for i in rows], dtype=torch.float32, device=dev)[:, None]
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    sub = sub - freq * counts - pres * (counts > 0)
    out[rows] = sub.to(out.dtype)
    return out


def _counts(token_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[len(token_lists), vocab] float occurrence counts (ids outside the vocabulary ignored)."""
    counts = torch.zeros(len(token_lists), vocab, dtype=torch.float32, device=device)
    for r, ids in enumerate(token_lists):
        if ids:
            t = torch.tensor(ids, dtype=torch.int64, device=device)
            t = t[(t >= 0) & (t < vocab)]
            counts[r].scatter_add_(0, t, torch.ones_like(t, dtype=torch.float32))
    return counts


def apply_penalties_ref(logits_row: list[float], prompt: list[int], output: list[int], repetition: float,
                        frequency: float, presence: float) -> list[float]:
    """One row, in plain Python: the definition the batched version is tested against."""
    row = list(logits_row)
    for t in set(prompt) | set(output):
        row[t] = row[t] / repetition if row[t] > 0 else row[t] * repetition
    for t in set(output):
        row[t] -= frequency * output.count(t) + presence
    return row

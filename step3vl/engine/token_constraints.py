"""Per-request rules on which tokens may come next (vLLM's SamplingParams semantics), applied to the logits
before penalties and sampling, in this order:

- allowed_token_ids: every other token is masked out;
- logit_bias {token id: bias}: added to those logits (OpenAI's logit_bias, bias in [-100, 100]);
- min_tokens: until a sample has that many output tokens, EOS (unless ignore_eos) and stop_token_ids are masked
  (and the engine checks no stop condition but the length limits).

Like the penalties, the rules read only the sequence itself: seeded draws stay independent of the batch.
"""

from __future__ import annotations

import torch


def has_constraints(params) -> bool:
    return bool(params.allowed_token_ids or params.logit_bias or params.min_tokens)


def apply_constraints(logits: torch.Tensor, num_outputs: list[int], params: list, eos_ids: set[int]) -> torch.Tensor:
    """logits [B, V] → constrained logits (a new tensor when any row has a rule)."""
    rows = [i for i, p in enumerate(params) if has_constraints(p)]
    if not rows:
        return logits
    out = logits.clone()
    vocab = out.shape[1]
    for i in rows:
        p = params[i]
        if p.allowed_token_ids:
            keep = torch.zeros(vocab, dtype=torch.bool, device=out.device)
            keep[torch.tensor(p.allowed_token_ids, device=out.device)] = True
            out[i].masked_fill_(~keep, float("-inf"))
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), dtype=torch.int64, device=out.device)
            out[i, ids] += torch.tensor(list(p.logit_bias.values()), dtype=out.dtype, device=out.device)
        if num_outputs[i] < p.min_tokens:
            banned = set(p.stop_token_ids) | (set() if p.ignore_eos else eos_ids)
            banned = [t for t in banned if 0 <= t < vocab]
            if banned:
                out[i, torch.tensor(banned, device=out.device)] = float("-inf")
    return out


def apply_constraints_ref(row: list[float], num_output: int, allowed: list[int] | None, bias: dict[int, float] | None,
                          min_tokens: int, stop_ids: list[int], eos_ids: set[int], ignore_eos: bool) -> list[float]:
    """One row in plain Python: the definition the batched version is tested against."""
    row = list(row)
    if allowed:
        row = [v if t in set(allowed) else float("-inf") for t, v in enumerate(row)]
    for t, b in (bias or {}).items():
        row[t] += b
    if num_output < min_tokens:
        for t in set(stop_ids) | (set() if ignore_eos else eos_ids):
            row[t] = float("-inf")
    return row

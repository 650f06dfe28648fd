"""Per-request rules on which tokens may come next (vLLM's SamplingParams semantics), applied to the logits
before penalties and sampling, in this order:

- allowed_token_ids: every other token is masked out;
- logit_bias {token id: bias}: added to those logits (OpenAI's logit_bias, bias in [-100, 100]);
- min_tokens: until a sample has that many output tokens, EOS (unless ignore_eos) and stop_token_ids are masked
  (and the engine checks no stop condition but the length limits);
- bad_words: each word tokenized as written and with a leading space (vLLM's rule); a word's last token is masked
  when the output ends with the rest of it (a one-token word: always).

Like the penalties, the rules read only the sequence itself: seeded draws stay independent of the batch.
"""

from __future__ import annotations

import torch


def has_constraints(params) -> bool:
    return bool(params.allowed_token_ids or params.logit_bias or params.min_tokens or params.bad_words)


def bad_words_token_ids(bad_words: list[str], encode) -> list[list[int]]:
    """vLLM's tokenization of bad words: each as written (left-stripped), and with a leading space where that
    gives a different first token and as many tokens (so the word is also banned mid-text)."""
    out: list[list[int]] = []
    for word in bad_words:
        plain = encode(word.lstrip())
        out.append(plain)
        spaced = encode(" " + word.lstrip())
        if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
            out.append(spaced)
    return out


def banned_by_bad_words(token_ids: list[int], num_prompt: int, bad_words_ids: list[list[int]]) -> set[int]:
    """The tokens that would complete a bad word at the end of the output (token_ids[num_prompt:]); reads only
    each word's length of the tail, not the whole output, since it runs every step."""
    banned = set()
    num_output = len(token_ids) - num_prompt
    for word in bad_words_ids:
        k = len(word) - 1
        if k <= num_output and (k == 0 or token_ids[-k:] == word[:-1]):
            banned.add(word[-1])
    return banned


def apply_constraints(logits: torch.Tensor, seqs: list, eos_ids: set[int]) -> torch.Tensor:
    """logits [B, V] (row i for seqs[i]) → constrained logits (a new tensor when any row has a rule). The allowed
    mask and the bias tensors are built once per request."""
    rows = [i for i, s in enumerate(seqs) if has_constraints(s.request.params)]
    if not rows:
        return logits
    out = logits.clone()
    for i in rows:
        seq, row = seqs[i], out[i]
        p = seq.request.params
        if p.allowed_token_ids:
            row.masked_fill_(~_allowed_mask(seq.request, row), float("-inf"))
        if p.logit_bias:
            ids, bias = _bias(seq.request, row)
            row[ids] += bias
        if len(seq.token_ids) - seq.num_prompt_tokens < p.min_tokens:
            banned = [t for t in set(p.stop_token_ids) | (set() if p.ignore_eos else eos_ids) if 0 <= t < row.numel()]
            if banned:
                row[torch.tensor(banned, device=row.device)] = float("-inf")
        if seq.request.bad_words_ids:
            banned = banned_by_bad_words(seq.token_ids, seq.num_prompt_tokens, seq.request.bad_words_ids)
            banned = [t for t in banned if 0 <= t < row.numel()]
            if banned:
                row[torch.tensor(banned, device=row.device)] = float("-inf")
    return out


def _allowed_mask(req, row: torch.Tensor) -> torch.Tensor:
    key = ("allowed", row.device)
    if key not in req.rule_cache:
        keep = torch.zeros(row.numel(), dtype=torch.bool, device=row.device)
        keep[torch.tensor(list(req.params.allowed_token_ids), dtype=torch.int64, device=row.device)] = True
        req.rule_cache[key] = keep
    return req.rule_cache[key]


def _bias(req, row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    key = ("bias", row.device, row.dtype)
    if key not in req.rule_cache:
        bias = req.params.logit_bias
        req.rule_cache[key] = (torch.tensor(list(bias), dtype=torch.int64, device=row.device),
                               torch.tensor(list(bias.values()), dtype=row.dtype, device=row.device))
    return req.rule_cache[key]


def apply_constraints_ref(row: list[float], num_output: int, allowed: list[int] | None, bias: dict[int, float] | None,
                          min_tokens: int, stop_ids: list[int], eos_ids: set[int], ignore_eos: bool,
                          bad_words_ids: list[list[int]] = (), output_ids: list[int] = ()) -> list[float]:
    """One row in plain Python: the definition the batched version is tested against."""
    row = list(row)
    for word in bad_words_ids:  # mask the word's last token if the output ends with all the rest of it
        k = len(word) - 1
        if k == 0 or (len(output_ids) >= k and list(output_ids[-k:]) == list(word[:-1])):
            row[word[-1]] = float("-inf")
    if allowed:
        row = [v if t in set(allowed) else float("-inf") for t, v in enumerate(row)]
    for t, b in (bias or {}).items():
        row[t] += b
    if num_output < min_tokens:
        for t in set(stop_ids) | (set() if ignore_eos else eos_ids):
            row[t] = float("-inf")
    return row

"""Prompt log-probs (vLLM's SamplingParams.prompt_logprobs): for every prompt token after the first, its
log-probability given the tokens before it, plus the k most likely alternatives.

They come from the prefill's own hidden states, a slab of rows at a time (a 2048-token chunk of 151k-vocab logits
at once would be over a GiB). A request that asks for them never reuses cached prompt blocks (their hidden
states are not kept), so every prompt position is computed; a preempted request that recomputes its prompt
writes the same values again.
"""

from __future__ import annotations

import torch

ROWS_PER_SLAB = 256


def wants_prompt_logprobs(req, start: int, length: int) -> bool:
    """Does this prefill chunk [start, start + length) of `req` cover prompt positions that predict a prompt token?"""
    return req.params.prompt_logprobs is not None and start < len(req.prompt_token_ids) - 1 and length > 0


@torch.inference_mode()
def record_prompt_logprobs(model, hidden: torch.Tensor, req, start: int) -> None:
    """hidden [L, H]: the chunk's rows for prompt positions start, start+1, ...; fills req.prompt_logprobs[p + 1]
    (a {token: logprob} dict with the actual token first) for the positions whose next token is in the prompt."""
    ids, k = req.prompt_token_ids, req.params.prompt_logprobs
    n = min(hidden.shape[0], len(ids) - 1 - start)  # the last prompt position predicts the first output token
    for a in range(0, n, ROWS_PER_SLAB):
        b = min(n, a + ROWS_PER_SLAB)
        logprobs = torch.log_softmax(model.compute_logits(hidden[a:b]).float(), dim=-1)
        targets = torch.tensor(ids[start + a + 1:start + b + 1], device=logprobs.device)
        actual = logprobs.gather(1, targets[:, None])[:, 0].tolist()
        top = logprobs.topk(k, dim=-1) if k else None
        for r in range(b - a):
            entry = {ids[start + a + r + 1]: actual[r]}
            if top is not None:
                for t, v in zip(top.indices[r].tolist(), top.values[r].tolist()):
                    entry.setdefault(t, v)
            req.prompt_logprobs[start + a + r + 1] = entry

"""Per-token log-probabilities of a packed batch under the model: the one forward every loss here is built on.

The LM head and log-softmax run over chunks of rows, each recomputed in the backward pass, so only one
[chunk, vocab] slab of logits is alive at a time (a 4K-token batch at Qwen3's 151,936-entry vocabulary would
otherwise hold 2.5 GB of fp32 logits plus their gradient).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from step3vl.model.vlm import Step3VLForCausalLM
from step3vl.train.data import IGNORE, PackedBatch


def hidden_states(model: Step3VLForCausalLM, batch: PackedBatch) -> torch.Tensor:
    """[T, hidden] final hidden states of the packed batch (images encoded here, with gradients when the
    vision tower trains)."""
    dev = model.device
    feats = None
    if batch.images:
        # The samples of one RL group share their prompt's image objects: encode each image once per batch
        # (autograd sums the gradients of its uses).
        unique = list({id(im): im for im in batch.images}.values())
        encoded = dict(zip(map(id, unique), model.encode_images(unique)))
        feats = torch.cat([encoded[id(im)] for im in batch.images])
    return model(batch.input_ids.to(dev), batch.positions.to(dev), batch.attention(), feats,
                 batch.image_mask.to(dev))


def _chunk_logprobs(lm_head: torch.nn.Module, h: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = lm_head(h).float()
    if temperature != 1.0:
        logits = logits / temperature
    safe = targets.clamp(min=0)
    return torch.log_softmax(logits, -1).gather(-1, safe[:, None])[:, 0]


def target_logprobs(model: Step3VLForCausalLM, batch: PackedBatch, chunk_rows: int = 1024,
                    temperature: float = 1.0) -> torch.Tensor:
    """[T] fp32: log p(targets[t] | tokens ≤ t) at each position, 0 where the target is IGNORE.
    temperature: divide the logits first (the distribution a sampler at that temperature drew from)."""
    hidden = hidden_states(model, batch)
    targets = batch.targets.to(hidden.device)
    rows = (targets != IGNORE).nonzero()[:, 0]
    out = torch.zeros(targets.shape[0], dtype=torch.float32, device=hidden.device)
    parts = []
    for s in range(0, rows.numel(), chunk_rows):
        idx = rows[s:s + chunk_rows]
        h, t = hidden[idx], targets[idx]
        if torch.is_grad_enabled() and h.requires_grad:
            parts.append(checkpoint(_chunk_logprobs, model.lm_head, h, t, temperature, use_reentrant=False))
        else:
            parts.append(_chunk_logprobs(model.lm_head, h, t, temperature))
    if parts:
        out = out.index_put((rows,), torch.cat(parts))
    return out


def next_token_loss(model: Step3VLForCausalLM, batch: PackedBatch, chunk_rows: int = 1024) -> tuple[torch.Tensor, int]:
    """(sum of cross-entropy over the batch's targets, number of targets): the caller divides by the targets of
    the whole optimizer step, so gradient accumulation gives the same update as one large batch."""
    lp = target_logprobs(model, batch, chunk_rows)
    return -lp.sum(), batch.num_targets


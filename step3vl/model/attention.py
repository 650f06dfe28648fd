"""The attention interface between the model and whoever runs it.

The decoder never owns a KV cache: each forward receives an `AttentionBackend`, which sees every layer's
new q/k/v and returns the attention output. Tests and training pass `DenseAttention` (packed variable-length
sequences, causal, no cache); the engine passes a paged backend that writes k/v into its block pool and
attends over the cached context.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch
import torch.nn.functional as F


class AttentionBackend(Protocol):
    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] for the T new tokens of this forward → output [T, Hq, D]."""
        ...


class DenseAttention:
    """Causal attention within each packed sequence; `seq_lens` splits the T tokens into sequences."""

    def __init__(self, seq_lens: Sequence[int]):
        self.seq_lens = [int(n) for n in seq_lens]

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        if sum(self.seq_lens) != q.shape[0]:
            raise ValueError(f"DenseAttention: seq_lens sum to {sum(self.seq_lens)} but q has {q.shape[0]} tokens")
        n = self.seq_lens[0]
        if all(m == n for m in self.seq_lens):  # equal lengths: one batched call
            b = len(self.seq_lens)
            qb, kb, vb = (x.view(b, n, *x.shape[1:]).transpose(1, 2) for x in (q, k, v))
            o = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale, enable_gqa=True)
            return o.transpose(1, 2).reshape(q.shape)
        outs = []
        for qs, ks, vs in zip(q.split(self.seq_lens), k.split(self.seq_lens), v.split(self.seq_lens)):
            # 4-D inputs: with 3-D ones the CPU SDPA falls back to its slow math kernel.
            o = F.scaled_dot_product_attention(
                qs.transpose(0, 1)[None], ks.transpose(0, 1)[None], vs.transpose(0, 1)[None],
                is_causal=True, scale=scale, enable_gqa=True)
            outs.append(o[0].transpose(0, 1))
        return torch.cat(outs)


class SharedPrefixAttention:
    """Packed groups, each a shared prefix followed by branches that continue it: prefix tokens attend causally
    within the prefix; a branch's tokens attend to the whole prefix and causally within their branch, never to a
    sibling. Training on the samples of one prompt then computes the prompt once — the trainer's counterpart of
    the engine forking n samples from one prefill. `groups`: (prefix_len, [branch_len, ...]) in token order."""

    def __init__(self, groups: Sequence[tuple[int, Sequence[int]]]):
        self.groups = [(int(p), [int(b) for b in branches]) for p, branches in groups]
        self.total = sum(p + sum(b) for p, b in self.groups)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        if self.total != q.shape[0]:
            raise ValueError(f"SharedPrefixAttention: groups cover {self.total} tokens but q has {q.shape[0]}")
        qh, kh, vh = (x.transpose(0, 1)[None] for x in (q, k, v))  # [1, H, T, D]
        outs, at = [], 0
        for prefix, branches in self.groups:
            pk, pv = kh[:, :, at:at + prefix], vh[:, :, at:at + prefix]
            if prefix:
                outs.append(F.scaled_dot_product_attention(qh[:, :, at:at + prefix], pk, pv, is_causal=True,
                                                           scale=scale, enable_gqa=True))
            at += prefix
            # Masked calls get k/v with the query's head count: fused kernels that take a mask do not all take
            # grouped heads, and the fallback would materialise [heads, n, prefix + n] scores.
            group = q.shape[1] // k.shape[1]
            for n in branches:
                ks = torch.cat([pk, kh[:, :, at:at + n]], dim=2).repeat_interleave(group, dim=1)
                vs = torch.cat([pv, vh[:, :, at:at + n]], dim=2).repeat_interleave(group, dim=1)
                # Row i sees the prefix and branch tokens 0..i: the causal mask shifted right by the prefix.
                mask = torch.ones(n, prefix + n, dtype=torch.bool, device=q.device).tril(prefix)
                outs.append(F.scaled_dot_product_attention(qh[:, :, at:at + n], ks, vs, attn_mask=mask, scale=scale))
                at += n
        return torch.cat(outs, dim=2)[0].transpose(0, 1)

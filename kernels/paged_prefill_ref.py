"""Reference paged prefill / extend attention: a chunk of new tokens per sequence, causal, against the
paged cache that already holds those tokens' K/V (chunked prefill and prefix-cache hits).

Query j of sequence b (q_len_b = cu_seqlens_q[b+1] - cu_seqlens_q[b]) sits at position
seq_lens[b] - q_len_b + j and attends to keys 0..that position. fp32 compute, q dtype out.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .paged_decode_ref import attend, check_cache, gather_kv


def check_prefill(q: Tensor, cu_seqlens_q: Tensor, seq_lens: Tensor, block_tables: Tensor) -> None:
    if q.dim() != 3:
        raise ValueError(f"paged_prefill: q must be [T, Hq, D], got {tuple(q.shape)}")
    b = seq_lens.shape[0]
    if cu_seqlens_q.shape != (b + 1,):
        raise ValueError(f"paged_prefill: cu_seqlens_q must be [B+1] = [{b + 1}], got {tuple(cu_seqlens_q.shape)}")
    if block_tables.dim() != 2 or block_tables.shape[0] != b:
        raise ValueError(f"paged_prefill: block_tables must be [{b}, M], got {tuple(block_tables.shape)}")


def paged_prefill(q: Tensor, k_cache: Tensor, v_cache: Tensor, cu_seqlens_q: Tensor, seq_lens: Tensor,
                  block_tables: Tensor, scale: float) -> Tensor:
    """q [T, Hq, D] (sequences packed by cu_seqlens_q) -> out [T, Hq, D]."""
    check_prefill(q, cu_seqlens_q, seq_lens, block_tables)
    check_cache(k_cache, v_cache, q.shape[1], q.shape[2], "paged_prefill")
    cu = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    if cu[0] != 0 or cu[-1] != q.shape[0]:
        raise ValueError(f"paged_prefill: cu_seqlens_q must run from 0 to T={q.shape[0]}, got {cu[0]}..{cu[-1]}")
    out = torch.empty_like(q)
    for b, seq_len in enumerate(lens):
        q_len = cu[b + 1] - cu[b]
        if q_len == 0:
            continue
        if q_len > seq_len:
            raise ValueError(f"paged_prefill: sequence {b} has {q_len} new tokens but seq_len {seq_len}")
        k, v, _ = gather_kv(k_cache, v_cache, block_tables[b:b + 1], seq_lens[b:b + 1], seq_len)
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        causal = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]
        o, _ = attend(q[None, cu[b]:cu[b + 1]], k, v, causal[None], scale)
        out[cu[b]:cu[b + 1]] = o[0].to(q.dtype)
    return out


paged_prefill_ref = paged_prefill

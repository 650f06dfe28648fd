"""Triton paged prefill / extend attention (semantics: paged_prefill_ref.py).

One program owns a tile of consecutive new tokens of one sequence and one kv head; its M dimension packs
(token, GQA head) so each K/V tile is loaded once for all the heads that share it. Query positions start at
seq_len - q_len, so the same kernel serves a fresh prompt, a chunk of a long prompt and a prefix-cache hit.
Tiles are assigned to sequences on the device (searchsorted over cu_seqlens_q): no host sync.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._triton_utils import cdiv, check_device, check_float, interpreting, next_pow2, tile_owner
from .paged_decode_ref import check_cache
from .paged_prefill_ref import check_prefill

LOG2E = 1.4426950408889634


@triton.jit
def _prefill_kernel(Q, K, V, OUT, CU, LENS, BT, n_seqs,
                    stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_bt, stride_ot, stride_oh,
                    block_size, qk_scale,
                    GH: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_S: tl.constexpr,
                    UPCAST: tl.constexpr, PREC: tl.constexpr):
    kvh = tl.program_id(1)
    seq, q_start, live = tile_owner(CU, n_seqs, tl.program_id(0), BLOCK_Q, BLOCK_S)
    seq = tl.minimum(seq, n_seqs - 1)  # programs past the last tile do nothing (live is False)
    t0 = tl.load(CU + seq)
    q_len = tl.load(CU + seq + 1) - t0
    seq_len = tl.load(LENS + seq)
    m = tl.arange(0, BLOCK_M)
    tok = m // GH
    head = kvh * GH + m % GH
    n_live = tl.where(live, q_len, 0)  # a scalar bool in a tensor mask trips the interpreter
    valid_m = (tok < BLOCK_Q) & (q_start + tok < n_live)
    q_pos = seq_len - q_len + q_start + tok
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_D
    row = (t0 + q_start + tok).to(tl.int64)
    q = tl.load(Q + row[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=valid_m[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    last_q = tl.minimum(q_start + BLOCK_Q, q_len) - 1
    kv_end = tl.where(live, tl.minimum(seq_len, seq_len - q_len + last_q + 1), 0)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_off = tl.arange(0, BLOCK_N)
    for n0 in range(0, kv_end, BLOCK_N):
        pos = n0 + n_off
        valid_n = pos < kv_end
        page = tl.load(BT + seq * stride_bt + pos // block_size, mask=valid_n, other=0).to(tl.int64)
        kv_off = page * stride_kb + (pos % block_size) * stride_ks + kvh * stride_kh
        kv_mask = valid_n[:, None] & d_ok[None, :]
        k = tl.load(K + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        s = tl.where(valid_n[None, :] & (pos[None, :] <= q_pos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet stay all-zero
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(OUT + row[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
             o.to(OUT.dtype.element_ty), mask=valid_m[:, None] & d_ok[None, :])


def _config(dtype: torch.dtype, gh: int) -> tuple[int, int, int, int]:
    """-> (BLOCK_M, BLOCK_N, num_warps, num_stages)."""
    if interpreting():
        return max(16, next_pow2(gh)) * 2, 16, 4, 1
    if dtype == torch.float32:
        return 64, 32, 4, 2
    return 128, 64, 8, 3


def paged_prefill(q: Tensor, k_cache: Tensor, v_cache: Tensor, cu_seqlens_q: Tensor, seq_lens: Tensor,
                  block_tables: Tensor, scale: float) -> Tensor:
    """q [T, Hq, D] -> out [T, Hq, D]; the new tokens' K/V are already in the cache. See paged_prefill_ref."""
    check_prefill(q, cu_seqlens_q, seq_lens, block_tables)
    check_cache(k_cache, v_cache, q.shape[1], q.shape[2], "paged_prefill")
    check_float("paged_prefill", q=q, k_cache=k_cache)
    check_device("paged_prefill", q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables)
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or k_cache.stride() != v_cache.stride():
        raise ValueError("paged_prefill: q and the caches need a contiguous last dimension, caches equal strides")
    n_tok, hq, d = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    n_seqs = seq_lens.shape[0]
    if n_tok == 0 or n_seqs == 0:
        return out
    hkv = k_cache.shape[2]
    gh = hq // hkv
    block_m, block_n, warps, stages = _config(k_cache.dtype, gh)
    block_q = max(1, block_m // gh)
    max_tiles = cdiv(n_tok, block_q) + n_seqs
    upcast = interpreting() or k_cache.dtype == torch.float32
    _prefill_kernel[(max_tiles, hkv)](
        q, k_cache, v_cache, out, cu_seqlens_q, seq_lens, block_tables, n_seqs,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1), k_cache.shape[1], scale * LOG2E,
        GH=gh, HEAD_D=d, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, next_pow2(d)), BLOCK_Q=block_q,
        BLOCK_S=max(16, next_pow2(n_seqs)), UPCAST=upcast,
        PREC="ieee" if upcast else "tf32", num_warps=warps, num_stages=stages)
    return out

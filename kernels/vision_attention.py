"""Triton fused vision-encoder attention (semantics: vision_attention_ref.py).

Non-causal flash attention over variable-length views packed by cu_seqlens, with the adjacent-pair RoPE
applied to q and k inside. A first small kernel rotates K once (every q tile would otherwise redo it per key
tile); the attention kernel rotates its q tile on load. head_dim that is not a power of two (96) is split into
a power-of-two part and a padded remainder (96 = 64 + 32) instead of padding the whole head to 128, so no
tensor-core work is spent on padding. Online softmax with fp32 accumulation.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._triton_utils import cdiv, check_device, check_float, interpreting, next_pow2, tile_owner
from .vision_attention_ref import check_vision

LOG2E = 1.4426950408889634


@triton.jit
def _load_rotated(X, COS, SIN, t, stride_xt, head_off, stride_ct, d, d_ok, row_ok):
    """Rows t of X (at head offset head_off), columns d, with the pair RoPE applied, in fp32."""
    mask = row_ok[:, None] & d_ok[None, :]
    base = X + t[:, None] * stride_xt + head_off
    x = tl.load(base + d[None, :], mask=mask, other=0.0).to(tl.float32)
    # The partner of element 2j is 2j+1 and vice versa: d ^ 1. (x0,x1) -> (x0 c - x1 s, x1 c + x0 s).
    xp = tl.load(base + (d ^ 1)[None, :], mask=mask, other=0.0).to(tl.float32)
    c = tl.load(COS + t[:, None] * stride_ct + d[None, :], mask=mask, other=0.0)
    s = tl.load(SIN + t[:, None] * stride_ct + d[None, :], mask=mask, other=0.0)
    sign = tl.where(d % 2 == 0, -1.0, 1.0)
    return x * c + xp * s * sign[None, :]


@triton.jit
def _rope_kernel(X, OUT, COS, SIN, n_rows, stride_xt, stride_xh, stride_ot, stride_oh, stride_ct,
                 H: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    row_ok = t < n_rows
    d_ok = d < HEAD_D
    x = _load_rotated(X, COS, SIN, t.to(tl.int64), stride_xt, h * stride_xh, stride_ct, d, d_ok, row_ok)
    tl.store(OUT + t.to(tl.int64)[:, None] * stride_ot + h * stride_oh + d[None, :],
             x.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _attn_tile(q1, q2, m_i, l_i, acc1, acc2, K, V, t0, n0, n, h, stride_kt, stride_kh, stride_vt, stride_vh,
               d1, d1_ok, d2, d2_ok, HEAD_D: tl.constexpr, D1: tl.constexpr, HAS_D2: tl.constexpr,
               BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
               UPCAST: tl.constexpr, PREC: tl.constexpr):
    """One key tile of the online softmax (q already rotated and scaled by scale*log2 e)."""
    kn = n0 + tl.arange(0, BLOCK_N)
    valid_n = kn < n
    tk = (t0 + kn).to(tl.int64)
    k_ptr = K + tk[:, None] * stride_kt + h * stride_kh + d1[None, :]
    v_ptr = V + tk[:, None] * stride_vt + h * stride_vh + d1[None, :]
    if MASKED or D1 > HEAD_D:
        kv1_mask = valid_n[:, None] & d1_ok[None, :]
        k1 = tl.load(k_ptr, mask=kv1_mask, other=0.0)
        v1 = tl.load(v_ptr, mask=kv1_mask, other=0.0)
    else:  # full tile of a power-of-two part: no mask at all
        k1 = tl.load(k_ptr)
        v1 = tl.load(v_ptr)
    if UPCAST:
        k1 = k1.to(tl.float32)
        v1 = v1.to(tl.float32)
    s = tl.dot(q1, tl.trans(k1), input_precision=PREC)
    if HAS_D2:
        kv2_mask = valid_n[:, None] & d2_ok[None, :]
        k2 = tl.load(K + tk[:, None] * stride_kt + h * stride_kh + d2[None, :], mask=kv2_mask, other=0.0)
        v2 = tl.load(V + tk[:, None] * stride_vt + h * stride_vh + d2[None, :], mask=kv2_mask, other=0.0)
        if UPCAST:
            k2 = k2.to(tl.float32)
            v2 = v2.to(tl.float32)
        s += tl.dot(q2, tl.trans(k2), input_precision=PREC)
    if MASKED:  # only the last, partial tile of a view pays for the key mask
        s = tl.where(valid_n[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc1 = acc1 * alpha[:, None] + tl.dot(p.to(v1.dtype), v1, input_precision=PREC)
    if HAS_D2:
        acc2 = acc2 * alpha[:, None] + tl.dot(p.to(v2.dtype), v2, input_precision=PREC)
    return m_new, l_i, acc1, acc2


@triton.jit
def _vision_attn_kernel(Q, K, V, OUT, COS, SIN, CU, n_seqs,
                        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                        stride_ot, stride_oh, stride_ct, qk_scale,
                        HEAD_D: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, HAS_D2: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
                        UPCAST: tl.constexpr, PREC: tl.constexpr):
    h = tl.program_id(1)
    seq, m0, live = tile_owner(CU, n_seqs, tl.program_id(0), BLOCK_M, BLOCK_S)
    seq = tl.minimum(seq, n_seqs - 1)
    t0 = tl.load(CU + seq)
    n = tl.where(live, tl.load(CU + seq + 1) - t0, 0)
    rows = m0 + tl.arange(0, BLOCK_M)
    valid_m = rows < n
    tq = (t0 + rows).to(tl.int64)
    d1 = tl.arange(0, D1)
    d2 = D1 + tl.arange(0, D2)
    d1_ok = d1 < HEAD_D
    d2_ok = d2 < HEAD_D
    q1 = _load_rotated(Q, COS, SIN, tq, stride_qt, h * stride_qh, stride_ct, d1, d1_ok, valid_m) * qk_scale
    q1 = q1.to(Q.dtype.element_ty)
    q2 = tl.zeros([BLOCK_M, D2], dtype=Q.dtype.element_ty)
    if HAS_D2:
        q2 = _load_rotated(Q, COS, SIN, tq, stride_qt, h * stride_qh, stride_ct, d2, d2_ok, valid_m) * qk_scale
        q2 = q2.to(Q.dtype.element_ty)
    if UPCAST:
        q1 = q1.to(tl.float32)
        q2 = q2.to(tl.float32)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, D2], dtype=tl.float32)
    n_full = (n // BLOCK_N) * BLOCK_N
    for n0 in range(0, n_full, BLOCK_N):
        m_i, l_i, acc1, acc2 = _attn_tile(q1, q2, m_i, l_i, acc1, acc2, K, V, t0, n0, n, h, stride_kt, stride_kh,
                                          stride_vt, stride_vh, d1, d1_ok, d2, d2_ok, HEAD_D, D1, HAS_D2, BLOCK_N,
                                          False, UPCAST, PREC)
    if n_full < n:
        m_i, l_i, acc1, acc2 = _attn_tile(q1, q2, m_i, l_i, acc1, acc2, K, V, t0, n_full, n, h, stride_kt,
                                          stride_kh, stride_vt, stride_vh, d1, d1_ok, d2, d2_ok, HEAD_D, D1, HAS_D2,
                                          BLOCK_N, True, UPCAST, PREC)
    inv_l = 1.0 / tl.where(l_i > 0, l_i, 1.0)
    o_base = OUT + tq[:, None] * stride_ot + h * stride_oh
    tl.store(o_base + d1[None, :], (acc1 * inv_l[:, None]).to(OUT.dtype.element_ty),
             mask=valid_m[:, None] & d1_ok[None, :])
    if HAS_D2:
        tl.store(o_base + d2[None, :], (acc2 * inv_l[:, None]).to(OUT.dtype.element_ty),
                 mask=valid_m[:, None] & d2_ok[None, :])


def _split_head_dim(d: int) -> tuple[int, int, bool]:
    """head_dim -> (D1, D2, has_d2): D1 the largest power of two <= d (>= 16), D2 the rest padded to a power
    of two >= 16 (a 16-wide dummy tile when there is no rest)."""
    d1 = max(16, 1 << (d.bit_length() - 1))
    rest = max(0, d - d1)
    return d1, max(16, next_pow2(rest)), rest > 0


def _config(dtype: torch.dtype) -> tuple[int, int, int, int]:
    """-> (BLOCK_M, BLOCK_N, num_warps, num_stages)."""
    if interpreting():
        return 32, 32, 4, 1
    if dtype == torch.float32:
        return 64, 32, 4, 2
    return 128, 64, 8, 3


def vision_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, cos: Tensor, sin: Tensor,
                     scale: float) -> Tensor:
    """q, k, v [T, H, D]; cu_seqlens [n+1] int32; cos, sin [T, D] fp32 -> out [T, H, D] (see the reference)."""
    check_vision(q, k, v, cu_seqlens, cos, sin)
    check_float("vision_attention", q=q, k=k, v=v)
    check_device("vision_attention", q, k, v, cu_seqlens, cos, sin)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"vision_attention: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if cos.dtype != torch.float32 or sin.dtype != torch.float32:
        raise ValueError(f"vision_attention: cos/sin must be fp32, got {cos.dtype}, {sin.dtype}")
    if cos.stride() != sin.stride() or cos.stride(-1) != 1:
        raise ValueError("vision_attention: cos and sin need equal strides and a contiguous last dimension")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("vision_attention: q, k, v need a contiguous last dimension")
    n_tok, n_heads, d = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    n_seqs = cu_seqlens.shape[0] - 1
    if n_tok == 0 or n_seqs == 0:
        return out
    k_rot = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    block_t = 16 if interpreting() else 32
    _rope_kernel[(cdiv(n_tok, block_t), n_heads)](
        k, k_rot, cos, sin, n_tok, k.stride(0), k.stride(1), k_rot.stride(0), k_rot.stride(1), cos.stride(0),
        H=n_heads, HEAD_D=d, BLOCK_T=block_t, BLOCK_D=max(16, next_pow2(d)), num_warps=4)
    d1, d2, has_d2 = _split_head_dim(d)
    block_m, block_n, warps, stages = _config(q.dtype)
    upcast = interpreting() or q.dtype == torch.float32
    _vision_attn_kernel[(cdiv(n_tok, block_m) + n_seqs, n_heads)](
        q, k_rot, v, out, cos, sin, cu_seqlens, n_seqs,
        q.stride(0), q.stride(1), k_rot.stride(0), k_rot.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), cos.stride(0), scale * LOG2E,
        HEAD_D=d, D1=d1, D2=d2, HAS_D2=has_d2, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_S=max(16, next_pow2(n_seqs)),
        UPCAST=upcast, PREC="ieee" if upcast else "tf32", num_warps=warps, num_stages=stages)
    return out

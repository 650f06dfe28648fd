"""Triton KV-cache write: one program per new token copies its [Hkv, D] k and v rows into the cache slot."""
from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from ._triton_utils import check_device, next_pow2
from .kv_write_ref import check_write


@triton.jit
def _kv_write_kernel(K, V, KC, VC, SLOT, block_size,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_cb, stride_cs, stride_ch,
                     H: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(SLOT + t).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    # slot < 0 means "skip" (padding tokens): fold it into the mask instead of branching.
    mask = (h[:, None] < H) & (d[None, :] < D)
    mask = mask & (tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.int64) + slot >= 0)
    k = tl.load(K + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
    v = tl.load(V + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
    dst = (slot // block_size) * stride_cb + (slot % block_size) * stride_cs + h[:, None] * stride_ch + d[None, :]
    tl.store(KC + dst, k.to(KC.dtype.element_ty), mask=mask)
    tl.store(VC + dst, v.to(VC.dtype.element_ty), mask=mask)


def write_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """In place: cache slot slot_mapping[t] <- k[t], v[t]; slots < 0 are skipped (see kv_write_ref)."""
    check_write(k, v, k_cache, v_cache, slot_mapping)
    check_device("write_kv", k, v, k_cache, v_cache, slot_mapping)
    for name, t in (("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"write_kv: {name} must have a contiguous last dimension, strides {t.stride()}")
    if k_cache.stride() != v_cache.stride():
        raise ValueError(f"write_kv: k_cache and v_cache strides differ: {k_cache.stride()} vs {v_cache.stride()}")
    n_tok, h, d = k.shape
    if n_tok == 0:
        return
    _kv_write_kernel[(n_tok,)](
        k, v, k_cache, v_cache, slot_mapping, k_cache.shape[1],
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        H=h, D=d, BLOCK_H=next_pow2(h), BLOCK_D=next_pow2(d))

"""Reference vision-encoder attention: 2D RoPE on q and k, then non-causal attention within each view.

RoPE pairs ADJACENT elements (x[2j], x[2j+1]) and rotates them by the angle whose cos/sin are cos[t, 2j]
(== cos[t, 2j+1]): (x0, x1) -> (x0*c - x1*s, x1*c + x0*s). Views are packed along T by cu_seqlens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def apply_rope_pairs(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [T, H, D], cos/sin [T, D] -> rotated x in fp32."""
    t, h, d = x.shape
    xp = x.float().reshape(t, h, d // 2, 2)
    c = cos.float()[:, None, 0::2]
    s = sin.float()[:, None, 0::2]
    x0, x1 = xp[..., 0], xp[..., 1]
    return torch.stack((x0 * c - x1 * s, x1 * c + x0 * s), dim=-1).reshape(t, h, d)


def check_vision(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, cos: Tensor, sin: Tensor) -> None:
    if q.dim() != 3 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"vision_attention: q, k, v must all be [T, H, D], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    t, _, d = q.shape
    if d % 2:
        raise ValueError(f"vision_attention: head_dim {d} must be even for pairwise RoPE")
    if cos.shape != (t, d) or sin.shape != (t, d):
        raise ValueError(f"vision_attention: cos/sin must be [T, D] = [{t}, {d}], got {tuple(cos.shape)}, "
                         f"{tuple(sin.shape)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"vision_attention: cu_seqlens must be [n+1], got {tuple(cu_seqlens.shape)}")


def vision_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, cos: Tensor, sin: Tensor,
                     scale: float) -> Tensor:
    """q, k, v [T, H, D] -> out [T, H, D] in q's dtype (fp32 compute)."""
    check_vision(q, k, v, cu_seqlens, cos, sin)
    cu = cu_seqlens.tolist()
    if cu[0] != 0 or cu[-1] != q.shape[0]:
        raise ValueError(f"vision_attention: cu_seqlens must run from 0 to T={q.shape[0]}, got {cu[0]}..{cu[-1]}")
    qr, kr = apply_rope_pairs(q, cos, sin), apply_rope_pairs(k, cos, sin)
    out = torch.empty_like(q)
    for a, b in zip(cu[:-1], cu[1:]):
        if b == a:
            continue
        o = F.scaled_dot_product_attention(qr[a:b].transpose(0, 1), kr[a:b].transpose(0, 1),
                                           v[a:b].float().transpose(0, 1), scale=scale)
        out[a:b] = o.transpose(0, 1).to(q.dtype)
    return out


vision_attention_ref = vision_attention

"""The decoder's small per-token ops on the CPU (csrc/cpu_ops.cpp), each beside its PyTorch reference.

At decode batch sizes a torch op's dispatch costs more than its arithmetic, and RMSNorm / rotate-half RoPE /
SiLU-and-multiply are several ops each; here each is one native call on fp32 tensors.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from .native import native


def _check(name: str, t: Tensor) -> None:
    if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError(f"{name}: needs a contiguous fp32 CPU tensor, got {t.dtype} on {t.device} "
                         f"(contiguous={t.is_contiguous()})")


def rms_norm_ref(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dim of x [..., H] with weight [H] -> new tensor."""
    step3vl_native = native()

    _check("rms_norm x", x)
    _check("rms_norm weight", weight)
    h = x.shape[-1]
    if weight.shape != (h,):
        raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} != ({h},)")
    out = torch.empty_like(x)
    step3vl_native.cpu_rms_norm(x.data_ptr(), weight.data_ptr(), float(eps), x.numel() // h, h, out.data_ptr())
    return out


def rope_rotate_half_ref(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None, :] + torch.cat([-x2, x1], dim=-1) * sin[:, None, :]


def rope_rotate_half_(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """In place on x [T, heads, D] (contiguous); cos/sin [T, D] -> x."""
    step3vl_native = native()

    _check("rope x", x)
    _check("rope cos", cos)
    _check("rope sin", sin)
    t, heads, d = x.shape
    if cos.shape != (t, d) or sin.shape != (t, d) or d % 2:
        raise ValueError(f"rope: x {tuple(x.shape)} needs cos/sin [{t}, {d}] (even D), got {tuple(cos.shape)}")
    step3vl_native.cpu_rope_rotate_half(x.data_ptr(), t, heads, d, heads * d, cos.data_ptr(), sin.data_ptr())
    return x


def silu_mul_ref(gate: Tensor, up: Tensor) -> Tensor:
    return F.silu(gate) * up


def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up for [..., I] tensors -> new tensor."""
    step3vl_native = native()

    _check("silu_mul gate", gate)
    _check("silu_mul up", up)
    if gate.shape != up.shape:
        raise ValueError(f"silu_mul: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
    inter = gate.shape[-1]
    out = torch.empty_like(gate)
    step3vl_native.cpu_silu_mul(gate.data_ptr(), up.data_ptr(), gate.numel() // max(inter, 1), inter, inter,
                                out.data_ptr())
    return out

"""CPU linear for decode-sized batches: the C++ kernel in csrc/cpu_linear.cpp, beside its reference.

y = x @ W^T (+ bias) in fp32 arithmetic. W is packed once as [ceil(N/16), K, 16] (16 output columns per k,
zero-padded), kept in bf16 when every weight is exactly a bf16 value (true for a bf16 checkpoint loaded in
fp32: the upcast is exact) so each decode step streams half the bytes with an unchanged fp32 result, else
in fp32. Few rows are memory-bound (the weights are read once per step whatever the batch), which is where
MKL's sgemm is weakest: at 16 rows it reaches a fraction of the FMA peak here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

COLUMNS = 16


def bf16_exact(w: Tensor) -> bool:
    """Whether every element survives a round trip through bf16 (so storing bf16 loses nothing)."""
    return bool(torch.equal(w.to(torch.bfloat16).to(w.dtype), w))


def pack_weight(w: Tensor, dtype: torch.dtype) -> Tensor:
    """[N, K] -> [ceil(N/16), K, 16] in dtype (bf16 or fp32), zero-padded columns."""
    if w.dim() != 2:
        raise ValueError(f"pack_weight: weight must be [N, K], got shape {tuple(w.shape)}")
    if dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"pack_weight: packed dtype must be bf16 or fp32, got {dtype}")
    n, k = w.shape
    nb = -(-n // COLUMNS)
    padded = torch.zeros(nb * COLUMNS, k, dtype=dtype)
    padded[:n] = w.to(dtype)
    return padded.view(nb, COLUMNS, k).transpose(1, 2).contiguous()


def unpack_weight(packed: Tensor, n: int) -> Tensor:
    """Inverse of pack_weight -> [N, K] fp32."""
    nb, k, _ = packed.shape
    return packed.float().transpose(1, 2).reshape(nb * COLUMNS, k)[:n]


def linear_packed_ref(x: Tensor, packed: Tensor, n: int, bias: Tensor | None = None) -> Tensor:
    """What linear_packed computes: fp32 F.linear with the unpacked weights."""
    return F.linear(x.float(), unpack_weight(packed, n), None if bias is None else bias.float())


def linear_packed(x: Tensor, packed: Tensor, n: int, bias: Tensor | None = None, *, simd: bool = True) -> Tensor:
    """x [..., K] -> [..., N] fp32. simd=False forces the portable path (tests compare both)."""
    import step3vl_native

    if packed.dim() != 3 or packed.shape[2] != COLUMNS or packed.shape[0] * COLUMNS < n:
        raise ValueError(f"linear_packed: packed weights must be [ceil({n}/16), K, 16], got {tuple(packed.shape)}")
    if packed.dtype not in (torch.bfloat16, torch.float32) or not packed.is_contiguous():
        raise ValueError(f"linear_packed: packed weights must be contiguous bf16 or fp32, got {packed.dtype}")
    k = packed.shape[1]
    if x.shape[-1] != k:
        raise ValueError(f"linear_packed: x has {x.shape[-1]} input features, the weights {k}")
    for name, t in (("x", x), ("packed", packed)):
        if t.device.type != "cpu":
            raise ValueError(f"linear_packed: {name} is on {t.device}; this kernel runs on the CPU")
    if bias is not None and (bias.shape != (n,) or bias.dtype != torch.float32 or not bias.is_contiguous()):
        raise ValueError(f"linear_packed: bias must be a contiguous fp32 [{n}], got {bias.dtype} {tuple(bias.shape)}")
    xf = x.reshape(-1, k).to(torch.float32).contiguous()
    y = torch.empty(xf.shape[0], n, dtype=torch.float32)
    if xf.shape[0]:
        step3vl_native.cpu_linear_packed(xf.data_ptr(), packed.data_ptr(), packed.dtype == torch.bfloat16,
                                         0 if bias is None else bias.data_ptr(), xf.shape[0], k, n, y.data_ptr(),
                                         simd)
    return y.view(*x.shape[:-1], n)

"""CPU linear for decode-sized batches: the C++ kernels in csrc/cpu_linear*.cpp, beside their reference.

y = x @ W^T (+ bias) in fp32 arithmetic. W is packed once as [ceil(N/16), K, 16] (16 output columns per k,
zero-padded), kept in bf16 when every weight is exactly a bf16 value (true for a bf16 checkpoint loaded in
fp32: the upcast is exact) so each decode step streams half the bytes with an unchanged fp32 result, else
in fp32. Few rows are memory-bound (the weights are read once per step whatever the batch), which is where
MKL's sgemm is weakest: at 16 rows it reaches a fraction of the FMA peak here. Where the CPU has AMX-BF16,
bf16 weights can be packed for the tile kernel: x is split into three bf16 terms (hi + mid + lo, exact to
~2^-27) that multiply the exact bf16 weights with fp32 accumulation, an fp32-accurate result at tile speed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from .native import native

COLUMNS = 16
AMX_K = 32  # k per AMX tile row: AMX packs pad K to a multiple of it


def bf16_exact(w: Tensor) -> bool:
    """Whether every element survives a round trip through bf16 (so storing bf16 loses nothing)."""
    return bool(torch.equal(w.to(torch.bfloat16).to(w.dtype), w))


def pack_weight(w: Tensor, dtype: torch.dtype, *, amx: bool = False) -> Tensor:
    """[N, K] -> the kernel's layout, zero-padded past N:
    fp32 or bf16: [ceil(N/16), K, 16] (16 output columns per k; the AVX-512 FMA kernel);
    bf16 with amx=True: [ceil(N/16), ceil(K/32) * 16, 16, 2] (k-pairs interleaved, K zero-padded to 32: the AMX
    tile layout)."""
    if w.dim() != 2:
        raise ValueError(f"pack_weight: weight must be [N, K], got shape {tuple(w.shape)}")
    if dtype not in (torch.bfloat16, torch.float32) or (amx and dtype != torch.bfloat16):
        raise ValueError(f"pack_weight: packed dtype must be bf16 or fp32 (bf16 for AMX), got {dtype}")
    n, k = w.shape
    nb = -(-n // COLUMNS)
    kp = -(-k // AMX_K) * AMX_K if amx else k
    padded = torch.zeros(nb * COLUMNS, kp, dtype=dtype)
    padded[:n, :k] = w.to(dtype)
    if amx:
        return padded.view(nb, COLUMNS, kp // 2, 2).permute(0, 2, 1, 3).contiguous()
    return padded.view(nb, COLUMNS, k).transpose(1, 2).contiguous()


def weight_layout(packed: Tensor) -> int:
    """The kernel's WeightLayout code (csrc/cpu_linear.h)."""
    if packed.dtype == torch.float32 and packed.dim() == 3:
        return 0
    if packed.dtype == torch.bfloat16:
        return 2 if packed.dim() == 4 else 1
    raise ValueError(f"linear_packed: not a packed weight: {packed.dtype} {tuple(packed.shape)}")


def unpack_weight(packed: Tensor, n: int, k: int | None = None) -> Tensor:
    """Inverse of pack_weight -> [N, K] fp32 (K: the true in_features, for AMX packs padded past it)."""
    if packed.dim() == 4:
        nb, kh, _, _ = packed.shape
        full = packed.float().permute(0, 2, 1, 3).reshape(nb * COLUMNS, kh * 2)
    else:
        nb, kk, _ = packed.shape
        full = packed.float().transpose(1, 2).reshape(nb * COLUMNS, kk)
    return full[:n, :k] if k is not None else full[:n]


def linear_packed_ref(x: Tensor, packed: Tensor, n: int, bias: Tensor | None = None) -> Tensor:
    """What linear_packed computes: fp32 F.linear with the unpacked weights."""
    return F.linear(x.float(), unpack_weight(packed, n, x.shape[-1]), None if bias is None else bias.float())


def linear_packed(x: Tensor, packed: Tensor, n: int, bias: Tensor | None = None, *, simd: bool = True) -> Tensor:
    """x [..., K] -> [..., N] fp32. simd=False forces the portable path (tests compare both)."""
    step3vl_native = native()

    layout = weight_layout(packed)
    amx_shape_ok = layout != 2 or (packed.shape[3] == 2 and packed.shape[1] % (AMX_K // 2) == 0)
    if packed.shape[2] != COLUMNS or packed.shape[0] * COLUMNS < n or not packed.is_contiguous() or not amx_shape_ok:
        raise ValueError(f"linear_packed: packed weights must come from pack_weight for {n} outputs, got "
                         f"{tuple(packed.shape)}")
    k = x.shape[-1]
    kw = packed.shape[1] * 2 if layout == 2 else packed.shape[1]
    if not (kw == k or (layout == 2 and kw == -(-k // AMX_K) * AMX_K)):
        raise ValueError(f"linear_packed: x has {k} input features, the weights {kw}")
    for name, t in (("x", x), ("packed", packed)):
        if t.device.type != "cpu":
            raise ValueError(f"linear_packed: {name} is on {t.device}; this kernel runs on the CPU")
    if bias is not None and (bias.shape != (n,) or bias.dtype != torch.float32 or not bias.is_contiguous()):
        raise ValueError(f"linear_packed: bias must be a contiguous fp32 [{n}], got {bias.dtype} {tuple(bias.shape)}")
    xf = x.reshape(-1, k).to(torch.float32).contiguous()
    y = torch.empty(xf.shape[0], n, dtype=torch.float32)
    if xf.shape[0]:
        step3vl_native.cpu_linear_packed(xf.data_ptr(), packed.data_ptr(), layout,
                                         0 if bias is None else bias.data_ptr(), xf.shape[0], k, n, y.data_ptr(),
                                         simd)
    return y.view(*x.shape[:-1], n)

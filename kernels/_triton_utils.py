"""Small shared helpers for the Triton kernels (no kernels here)."""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (TRITON_INTERPRET=1): upcast bf16, one config, small tiles."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def check_device(fn: str, *tensors: Tensor) -> None:
    """Triton kernels need CUDA tensors, or CPU tensors under the interpreter; all on one device."""
    dev = tensors[0].device
    for t in tensors:
        if t.device != dev:
            raise ValueError(f"{fn}: all tensors must be on one device, got {dev} and {t.device}")
    if dev.type != "cuda" and not interpreting():
        raise ValueError(f"{fn}: Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1), got {dev}")


def check_float(fn: str, **tensors: Tensor) -> None:
    for name, t in tensors.items():
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"{fn}: {name} must be fp32/fp16/bf16, got {t.dtype}")


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    if not torch.cuda.is_available():
        return 8
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_sms(t: Tensor) -> int:
    return num_sms(t.device.index or 0) if t.device.type == "cuda" else 8


@triton.jit
def tile_owner(CU, n_seqs, tile, TILE: tl.constexpr, BLOCK_S: tl.constexpr):
    """Program `tile` -> (sequence, first row in it, live) for sequences packed by CU [n_seqs+1].

    Sequence b owns cdiv(len_b, TILE) consecutive programs; programs past the last tile are not live.
    Done in the kernel (a scan over the sequence lengths) so the launch needs no host sync and no extra ops.
    """
    i = tl.arange(0, BLOCK_S)
    lo = tl.load(CU + i, mask=i < n_seqs, other=0)
    hi = tl.load(CU + i + 1, mask=i < n_seqs, other=0)
    n_tiles = (hi - lo + TILE - 1) // TILE
    ends = tl.cumsum(n_tiles, 0)
    seq = tl.sum((ends <= tile).to(tl.int32), 0)
    first = tl.sum(tl.where(i < seq, n_tiles, 0), 0)
    return seq, (tile - first) * TILE, seq < n_seqs

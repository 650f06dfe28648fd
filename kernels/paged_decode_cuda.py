"""Paged decode attention in CUDA (csrc/cuda/paged_decode.cu), to measure against the Triton paged_decode.

Same contract: q [B, Hq, D], k_cache / v_cache [num_blocks, block_size, Hkv, D], block_tables int32 [B, M],
seq_lens int32 [B] -> out [B, Hq, D] (and lse [B, Hq] fp32, natural log, -inf for an empty sequence whose output
is 0). fp16 / bf16, fp32 accumulation. One CTA per (sequence, kv head, chunk of up to 8 of its q heads, split of
the context); with several splits a second kernel merges the partial results by their LSE. CUDA tensors only: the
CPU path is the Triton helper's paged_decode_ref.
"""
from __future__ import annotations

import functools
import math

import torch

from . import cuda_launch as cl

HEAD_DIMS = (32, 64, 128, 256)
GROUP_CHUNKS = (1, 2, 4, 8)  # q heads per CTA (template MAX_G); bigger GQA groups take several chunks
THREADS = 128  # kWarps * 32
MIN_TOKENS_PER_SPLIT = 256
CTAS_PER_SM = 4  # resident CTAs per SM that the split targets (the kernel fits about 4 at 128 threads)
MAX_SPLITS = 64
_DTYPES = {torch.float16: "f16", torch.bfloat16: "bf16"}


def group_chunk(group: int) -> int:
    """q heads per CTA: the smallest template size holding the whole GQA group, else the largest."""
    return next((g for g in GROUP_CHUNKS if g >= group), GROUP_CHUNKS[-1])


def tokens_per_split(max_context: int, num_splits: int, block_size: int) -> int:
    """As paged_decode.h: ceil(max_context / num_splits) rounded up to whole blocks (at least one block)."""
    per = -(-max(max_context, 1) // max(num_splits, 1))
    return -(-per // block_size) * block_size


def choose_num_splits(max_context: int, ctas: int, num_sms: int) -> int:
    """As many splits as fit in one wave of CTAS_PER_SM CTAs per SM (a second, partial wave costs a whole CTA
    time: on an H100, 16 x 8 CTAs took 159 us with 4 splits, 223 us with 5, 164 us with 8), without splits
    shorter than MIN_TOKENS_PER_SPLIT."""
    want = CTAS_PER_SM * num_sms // ctas
    return max(1, min(want, -(-max_context // MIN_TOKENS_PER_SPLIT), MAX_SPLITS))


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def check_decode_args(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      seq_lens: torch.Tensor) -> None:
    if q.device.type != "cuda":
        raise ValueError("paged_decode_cuda needs CUDA tensors; on the CPU use step3vl_kernels.paged_decode_ref")
    if q.dtype not in _DTYPES:
        raise TypeError(f"q must be float16 or bfloat16, got {q.dtype}")
    if q.dim() != 3 or k_cache.dim() != 4:
        raise ValueError(f"q must be [B, Hq, D] and k_cache [num_blocks, block_size, Hkv, D], got "
                         f"{tuple(q.shape)} and {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} {k_cache.dtype} and v_cache {tuple(v_cache.shape)} "
                         f"{v_cache.dtype} must match each other and q's dtype {q.dtype}")
    B, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    if k_cache.shape[3] != D or D not in HEAD_DIMS:
        raise ValueError(f"head_dim must match (q {D}, cache {k_cache.shape[3]}) and be one of {HEAD_DIMS}")
    if Hq % Hkv:
        raise ValueError(f"num_q_heads {Hq} must be a multiple of num_kv_heads {Hkv}")
    if block_tables.dtype != torch.int32 or block_tables.dim() != 2 or block_tables.shape[0] != B:
        raise ValueError(f"block_tables must be int32 [B={B}, M], got {block_tables.dtype} {tuple(block_tables.shape)}")
    if seq_lens.dtype != torch.int32 or seq_lens.shape != (B,):
        raise ValueError(f"seq_lens must be int32 [B={B}], got {seq_lens.dtype} {tuple(seq_lens.shape)}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("block_tables", block_tables),
                    ("seq_lens", seq_lens)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous")


def check_decode_lengths(k_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor) -> None:
    """Lengths within the tables and valid table entries within the pool (one synchronization)."""
    num_blocks, block_size = k_cache.shape[:2]
    M = block_tables.shape[1]
    used = (seq_lens.long() + block_size - 1) // block_size
    in_use = torch.arange(M, device=block_tables.device) < used[:, None]
    bad_entry = in_use & ((block_tables < 0) | (block_tables >= num_blocks))
    bad_len = (seq_lens < 0) | (used > M)
    if bool(bad_len.any()):
        raise ValueError(f"seq_lens must lie in [0, {M * block_size}] (block_tables has {M} blocks of "
                         f"{block_size}), got range [{int(seq_lens.min())}, {int(seq_lens.max())}]")
    if bool(bad_entry.any()):
        raise IndexError(f"block_tables entries in use must lie in [0, {num_blocks})")


def paged_decode_cuda(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      seq_lens: torch.Tensor, scale: float, return_lse: bool = False, num_splits: int | None = None,
                      validate: bool = True) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Decode attention of one query token per sequence over its paged KV. `num_splits` None picks a split of
    the context from the grid size; `validate=False` skips the synchronizing length/table check (benchmarks)."""
    check_decode_args(q, k_cache, v_cache, block_tables, seq_lens)
    if validate:
        check_decode_lengths(k_cache, block_tables, seq_lens)
    B, Hq, D = q.shape
    block_size, Hkv = k_cache.shape[1], k_cache.shape[2]
    q, block_tables = q.contiguous(), block_tables.contiguous()
    max_blocks = block_tables.shape[1]
    g = group_chunk(Hq // Hkv)
    ctas = Hkv * -(-(Hq // Hkv) // g) * B
    device = q.device
    if num_splits is None:
        num_splits = choose_num_splits(max_blocks * block_size, max(ctas, 1), _num_sms(device.index))
    if not 1 <= num_splits <= 65535:
        raise ValueError(f"num_splits must be in [1, 65535], got {num_splits}")
    per_split = tokens_per_split(max_blocks * block_size, num_splits, block_size)
    out = torch.empty_like(q)
    lse = torch.empty(B, Hq, dtype=torch.float32, device=device) if return_lse else None
    parts = parts_lse = None
    if num_splits > 1:
        parts = torch.empty(B, Hq, num_splits, D, dtype=torch.float32, device=device)
        parts_lse = torch.empty(B, Hq, num_splits, dtype=torch.float32, device=device)
    dt = _DTYPES[q.dtype]
    with torch.cuda.device(device):
        module = cl.load_module("paged_decode", device.index)
        cl.launch(module, f"paged_decode_{dt}_d{D}_g{g}", (ctas // max(B, 1), B, num_splits), (THREADS,),
                  [cl.ptr(q), cl.ptr(k_cache), cl.ptr(v_cache), cl.ptr(block_tables), cl.i64(max_blocks),
                   cl.ptr(seq_lens), cl.ptr(out), cl.ptr(lse), cl.ptr(parts), cl.ptr(parts_lse), cl.i32(Hq),
                   cl.i32(Hkv), cl.i32(block_size), cl.f32(scale * math.log2(math.e)), cl.i64(per_split)])
        if num_splits > 1:
            cl.launch(module, f"paged_decode_merge_{dt}", (B * Hq,), (min(D, 128),),
                      [cl.ptr(parts), cl.ptr(parts_lse), cl.ptr(out), cl.ptr(lse), cl.i32(num_splits), cl.i32(D)])
    return (out, lse) if return_lse else out

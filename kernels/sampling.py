"""Triton sampler: temperature / top-k / top-p / min-p by Gumbel-max with counter-based uniforms.

Semantics and the random stream are those of sampling_ref.py, token for token: the per-row keep threshold
comes from the same torch function (filter_threshold, one sort when top-k/top-p is on), and the kernel
hashes (seed, sample, step, token) with the same 32-bit mixer (uint32 arithmetic wraps like the reference's
masked int64), forms the same float64 uniform and takes argmax(z + Gumbel) over the kept tokens.
The vocabulary is split into chunks over programs (B rows alone would leave most of the GPU idle); each chunk
writes its best (score, index) and a final argmax over chunks picks the earliest maximum.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._triton_utils import cdiv, check_device, interpreting
from .sampling_ref import check_sampling_args, filter_threshold, scaled_logits


@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _sample_kernel(LOGITS, INV_T, THR, TEMP, SEED, SAMPLE, STEP, BEST_VAL, BEST_IDX, vocab, stride_l,
                   CHUNK: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    seed = tl.load(SEED + row).to(tl.int64)
    h = _mix32((seed & 0xFFFFFFFF).to(tl.uint32) ^ 0x9E3779B9)
    h = _mix32(h ^ ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32))
    h = _mix32(h ^ (tl.load(SAMPLE + row).to(tl.int64) & 0xFFFFFFFF).to(tl.uint32))
    key = _mix32(h ^ (tl.load(STEP + row).to(tl.int64) & 0xFFFFFFFF).to(tl.uint32))
    inv_t = tl.load(INV_T + row)
    thr = tl.load(THR + row)
    greedy = tl.load(TEMP + row) <= 0
    best_val = tl.full([], float("-inf"), tl.float64)
    best_idx = tl.full([], 0, tl.int32)
    for v0 in range(chunk * CHUNK, chunk * CHUNK + CHUNK, BLOCK_V):
        idx = v0 + tl.arange(0, BLOCK_V)
        ok = idx < vocab
        x = tl.load(LOGITS + row.to(tl.int64) * stride_l + idx, mask=ok, other=float("-inf")).to(tl.float32)
        z = x * inv_t
        t = idx.to(tl.uint32) + 0x632BE5AB
        bits = _mix32(key ^ _mix32(t)) >> 8
        u = (bits.to(tl.float64) + 0.5) * 5.9604644775390625e-08  # 2**-24: exact in float64
        score = z.to(tl.float64) - tl.log(-tl.log(u))
        score = tl.where(ok & (z >= thr), score, float("-inf"))
        score = tl.where(greedy, x.to(tl.float64), score)
        tile_best = tl.max(score, 0)
        tile_idx = tl.argmax(score, 0, tie_break_left=True) + v0
        better = tile_best > best_val  # strict: on ties the earlier chunk/tile wins
        best_idx = tl.where(better, tile_idx, best_idx)
        best_val = tl.where(better, tile_best, best_val)
    tl.store(BEST_VAL + row * tl.num_programs(1) + chunk, best_val)
    tl.store(BEST_IDX + row * tl.num_programs(1) + chunk, best_idx.to(tl.int64))


def sample(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor,
           seeds: Tensor, sample_index: Tensor, step: Tensor) -> Tensor:
    """logits [B, V] -> tokens int64 [B]; same draws as sampling_ref.sample."""
    check_sampling_args(logits, temperature, top_k, top_p, min_p, seeds, sample_index, step)
    check_device("sample", logits, temperature, top_k, top_p, min_p, seeds, sample_index, step)
    if logits.stride(-1) != 1:
        raise ValueError(f"sample: logits need a contiguous last dimension, strides {logits.stride()}")
    bsz, vocab = logits.shape
    if bsz == 0:
        return torch.empty(0, dtype=torch.int64, device=logits.device)
    filtering = bool(((top_k > 0) & (top_k < vocab) | (top_p < 1.0) | (min_p > 0.0)).any())
    if filtering:
        z, inv_t = scaled_logits(logits, temperature)
        thr = filter_threshold(z, top_k, top_p, min_p).float()
    else:
        _, inv_t = scaled_logits(logits[:, :0], temperature)
        thr = torch.full((bsz,), float("-inf"), device=logits.device)
    block_v = 256 if interpreting() else 1024
    chunk = block_v if interpreting() else 8 * block_v
    n_chunks = cdiv(vocab, chunk)
    best_val = torch.empty(bsz, n_chunks, dtype=torch.float64, device=logits.device)
    best_idx = torch.empty(bsz, n_chunks, dtype=torch.int64, device=logits.device)
    _sample_kernel[(bsz, n_chunks)](
        logits, inv_t.contiguous(), thr.contiguous(), temperature.float().contiguous(), seeds, sample_index, step,
        best_val, best_idx, vocab, logits.stride(0), CHUNK=chunk, BLOCK_V=block_v, num_warps=4)
    return best_idx.gather(1, best_val.argmax(dim=1, keepdim=True))[:, 0]

"""The CPU sampler: sampling_ref's algorithm with the stream keys and the [B, V] uniforms hashed in C++
(csrc/cpu_sampling.cpp).

The hashes are integer-exact and the rest is the reference's own torch arithmetic, so the drawn tokens are
bit-identical to sampling_ref.sample; only the cost changes (the torch hash spends most of a decode step's
sampling time in int64 tensor passes).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import sampling_ref
from .native import native


def uniforms(key: Tensor, vocab: int) -> Tensor:
    """[B] stream keys (int64 in [0, 2**32)) -> [B, vocab] float64, as sampling_ref.uniforms."""
    step3vl_native = native()

    if key.device.type != "cpu" or key.dim() != 1:
        raise ValueError(f"sampling_cpu.uniforms: keys must be a 1-D CPU tensor, got {tuple(key.shape)} on {key.device}")
    key = key.to(torch.int64).contiguous()
    out = torch.empty(key.shape[0], vocab, dtype=torch.float64)
    if out.numel():
        step3vl_native.cpu_sampling_uniforms(key.data_ptr(), key.shape[0], vocab, out.data_ptr())
    return out


def stream_key(seeds: Tensor, sample_index: Tensor, step: Tensor) -> Tensor:
    """As sampling_ref.stream_key for [B] tensors (scalars broadcast)."""
    step3vl_native = native()

    seeds, sample_index, step = (t.to(torch.int64) for t in torch.broadcast_tensors(
        torch.as_tensor(seeds), torch.as_tensor(sample_index), torch.as_tensor(step)))
    if seeds.dim() != 1 or seeds.device.type != "cpu":
        raise ValueError(f"sampling_cpu.stream_key: needs 1-D CPU tensors (after broadcasting), got "
                         f"{tuple(seeds.shape)} on {seeds.device}")
    seeds, sample_index, step = seeds.contiguous(), sample_index.contiguous(), step.contiguous()
    keys = torch.empty_like(seeds)
    step3vl_native.cpu_sampling_stream_keys(seeds.data_ptr(), sample_index.data_ptr(), step.data_ptr(),
                                            seeds.shape[0], keys.data_ptr())
    return keys


def sample(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor,
           seeds: Tensor, sample_index: Tensor, step: Tensor) -> Tensor:
    """Same contract and same tokens as sampling_ref.sample."""
    sampling_ref.check_sampling_args(logits, temperature, top_k, top_p, min_p, seeds, sample_index, step)
    z, _ = sampling_ref.scaled_logits(logits, temperature)
    thr = sampling_ref.filter_threshold(z, top_k, top_p, min_p)
    drawn = sampling_ref.gumbel_argmax(z, thr, uniforms(stream_key(seeds, sample_index, step), logits.shape[1]))
    greedy = temperature <= 0
    if not bool(greedy.any()):
        return drawn
    return torch.where(greedy, logits.float().argmax(dim=-1), drawn)

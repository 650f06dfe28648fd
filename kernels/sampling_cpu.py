"""The CPU sampler: sampling_ref.sample with the [B, V] uniforms hashed in C++ (csrc/cpu_sampling.cpp).

The hash is integer-exact, so the uniforms, and therefore the drawn tokens, are bit-identical to the
reference's; only their cost changes (the torch version spends most of a decode step's sampling time on
int64 tensor passes).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import sampling_ref


def uniforms(key: Tensor, vocab: int) -> Tensor:
    """[B] stream keys (int64 in [0, 2**32)) -> [B, vocab] float64, as sampling_ref.uniforms."""
    import step3vl_native

    if key.device.type != "cpu" or key.dim() != 1:
        raise ValueError(f"sampling_cpu.uniforms: keys must be a 1-D CPU tensor, got {tuple(key.shape)} on {key.device}")
    key = key.to(torch.int64).contiguous()
    out = torch.empty(key.shape[0], vocab, dtype=torch.float64)
    if out.numel():
        step3vl_native.cpu_sampling_uniforms(key.data_ptr(), key.shape[0], vocab, out.data_ptr())
    return out


def sample(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor,
           seeds: Tensor, sample_index: Tensor, step: Tensor) -> Tensor:
    """Same contract and same tokens as sampling_ref.sample."""
    return sampling_ref.sample(logits, temperature, top_k, top_p, min_p, seeds, sample_index, step,
                               uniforms_fn=uniforms)

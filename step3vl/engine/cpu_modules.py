"""The decoder on the CPU through the native kernels (step3vl_kernels.linear_cpu, decoder_ops_cpu).

After loading, the engine swaps parts of the text decoder when it runs in fp32 on a CPU with AVX-512:
- nn.Linear (and the LM head) -> PackedLinear: weights packed once for the kernel and kept in bf16 when that is
  exact (a bf16 checkpoint), so every decode step streams half the bytes; on CPUs with AMX-BF16 they feed the
  tile kernel (activations split into three bf16 terms: fp32-accurate), elsewhere the AVX-512 FMA kernel;
- RMSNorm -> NativeRMSNorm, and the attention's rotary / the MLP's SiLU-and-multiply -> one native call each.
The model code is unchanged (these are the hooks it exposes); the vision encoder keeps its torch layers
(large batches, once per image).
"""

from __future__ import annotations

import torch
from torch import nn

from step3vl.model.decoder import Qwen3Attention, Qwen3MLP, RMSNorm
from step3vl_kernels.decoder_ops_cpu import rms_norm, rope_rotate_half_, silu_mul
from step3vl_kernels.linear_cpu import bf16_exact, linear_packed, pack_weight
from step3vl_kernels.native import cpu_has_amx, cpu_has_avx512


class PackedLinear(nn.Module):
    """amx: pack bf16-exact weights for the AMX tile kernel (fp32-accurate, faster for batches) rather than for
    the AVX-512 FMA kernel (bit-for-bit an fp32 FMA loop, faster for a single row)."""

    def __init__(self, linear: nn.Linear, amx: bool = False):
        super().__init__()
        w = linear.weight.detach()
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        exact = bf16_exact(w)
        self.register_buffer("packed", pack_weight(w, torch.bfloat16 if exact else torch.float32, amx=amx and exact))
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_packed(x, self.packed, self.out_features, self.bias).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed={self.packed.dtype}"


class NativeRMSNorm(nn.Module):
    def __init__(self, norm: RMSNorm):
        super().__init__()
        self.weight = nn.Parameter(norm.weight.detach().float().contiguous(), requires_grad=False)
        self.eps = norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x.contiguous(), self.weight, self.eps)


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return rope_rotate_half_(x.contiguous(), cos, sin)


def should_use_native(model: nn.Module, dtype: torch.dtype) -> bool:
    """fp32 on a CPU with AVX-512 (elsewhere MKL / oneDNN's own paths are the better choice)."""
    device = next(model.parameters()).device
    return device.type == "cpu" and dtype == torch.float32 and cpu_has_avx512()


def use_native_decoder(model: nn.Module, amx: bool | None = None) -> int:
    """Swap the text decoder's layers in place (see the module doc); returns how many modules changed.
    amx: use the AMX tile kernel for bf16 weights (default: where the CPU has it)."""
    amx = cpu_has_amx() if amx is None else amx
    count = 0
    for parent in list(model.model.modules()) + [model]:
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and (parent is not model or name == "lm_head"):
                setattr(parent, name, PackedLinear(child, amx))
            elif isinstance(child, RMSNorm) and parent is not model:
                setattr(parent, name, NativeRMSNorm(child))
            else:
                continue
            count += 1
        if isinstance(parent, Qwen3Attention):
            parent.rotary = _rotary
        if isinstance(parent, Qwen3MLP):
            parent.act_mul = silu_mul
    return count

"""Decoder linears on the CPU through the packed C++ kernel (step3vl_kernels.linear_cpu).

After loading, the engine swaps the text decoder's nn.Linear layers (and the LM head) for PackedLinear when it
runs in fp32 on a CPU with AVX-512: the weights are packed once for the kernel and kept in bf16 when that is
exact (a bf16 checkpoint), so every decode step streams half the bytes for the same fp32 result. The model
code is unchanged; the vision encoder keeps nn.Linear (large batches, once per image).
"""

from __future__ import annotations

import torch
from torch import nn

from step3vl_kernels.linear_cpu import bf16_exact, linear_packed, pack_weight


class PackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach()
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        self.register_buffer("packed", pack_weight(w, torch.bfloat16 if bf16_exact(w) else torch.float32))
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_packed(x, self.packed, self.out_features, self.bias).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed={self.packed.dtype}"


def should_pack(model: nn.Module, dtype: torch.dtype) -> bool:
    """fp32 on a CPU with AVX-512 (elsewhere MKL / oneDNN's own paths are the better choice)."""
    import step3vl_native

    device = next(model.parameters()).device
    return device.type == "cpu" and dtype == torch.float32 and step3vl_native.cpu_has_avx512()


def pack_decoder_linears(model: nn.Module) -> int:
    """Replace the text decoder's and the LM head's nn.Linear layers in place; returns how many."""
    count = 0
    targets = [model.model] if hasattr(model, "model") else []
    for parent in [m for t in targets for m in t.modules()] + [model]:
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and (parent is not model or name == "lm_head"):
                setattr(parent, name, PackedLinear(child))
                count += 1
    return count

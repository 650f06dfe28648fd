"""Rotary position embeddings: 1-D rotate-half for the decoder, 2-D interleaved for the vision encoder."""

from __future__ import annotations

import torch


def rope_inv_freq(dim: int, theta: float) -> torch.Tensor:
    # Always on the CPU: under a meta-device context this would otherwise pull in torch._dynamo's fallback.
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder RoPE tables for rotate-half: [T, D] each, fp32."""
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D]; cos/sin [T, D]. Same arithmetic order as transformers' Qwen3 (cast tables to x's dtype)."""
    cos, sin = cos.to(x.dtype)[:, None, :], sin.to(x.dtype)[:, None, :]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def vision_rope_cos_sin(grid: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D RoPE tables for a grid×grid patch image, [grid*grid, head_dim] fp32, row-major patches.

    Half the head is rotated by the column, half by the row; within each half the frequencies are repeated
    twice so that adjacent elements (2j, 2j+1) form a rotation pair.
    """
    half = head_dim // 2
    inv_freq = rope_inv_freq(half, theta).repeat_interleave(2)  # [half]
    rows = torch.arange(grid).repeat_interleave(grid).float()
    cols = torch.arange(grid).repeat(grid).float()
    angles = torch.cat([cols[:, None] * inv_freq, rows[:, None] * inv_freq], dim=-1)
    return angles.cos(), angles.sin()


def apply_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., T, H, D] rotated in adjacent pairs: (x0, x1) → (x0·c − x1·s, x1·c + x0·s). Computed in fp32."""
    xf = x.float()
    x0, x1 = xf[..., 0::2], xf[..., 1::2]
    rotated = torch.stack([-x1, x0], dim=-1).flatten(-2)
    c, s = cos[:, None, :], sin[:, None, :]
    return (xf * c + rotated * s).to(x.dtype)

"""Perception-Encoder ViT (STEP3-VL's vision tower): patch conv, learned positions, 2-D RoPE, LayerScale."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from step3vl.config import VisionConfig
from step3vl.model.rope import apply_interleaved, vision_rope_cos_sin

# (q, k, v [T, H, D] before RoPE, cu_seqlens [n+1] int32, cos, sin [T, D] fp32, scale) -> out [T, H, D].
# The same contract as step3vl_kernels.vision_attention, so the fused kernel plugs in unchanged.
VisionAttentionFn = Callable[..., torch.Tensor]


def sdpa_vision_attention(q, k, v, cu_seqlens, cos, sin, scale) -> torch.Tensor:
    """Reference path: rotate q/k, then non-causal SDPA per view (all views here have equal length)."""
    q, k = apply_interleaved(q, cos, sin), apply_interleaved(k, cos, sin)
    n = int(cu_seqlens[1] - cu_seqlens[0])
    views = q.shape[0] // n
    q, k, v = (x.view(views, n, *x.shape[1:]).transpose(1, 2) for x in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return out.transpose(1, 2).reshape(views * n, out.shape[1], out.shape[3])


def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    if name == "gelu":
        return F.gelu
    return lambda x: F.gelu(x, approximate="tanh")


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.in_proj_weight = nn.Parameter(torch.empty(3 * cfg.width, cfg.width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * cfg.width))
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x, cu_seqlens, cos, sin, attn_fn: VisionAttentionFn) -> torch.Tensor:
        t = x.shape[0]
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(t, 3, self.heads, self.head_dim)
        q, k, v = qkv.unbind(1)
        out = attn_fn(q, k, v, cu_seqlens, cos, sin, self.head_dim ** -0.5)
        return self.out_proj(out.reshape(t, -1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.width, cfg.intermediate_size)
        self.c_proj = nn.Linear(cfg.intermediate_size, cfg.width)
        self.act = _activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class ResidualBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = VisionAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)
        use_ls = cfg.ls_init_value is not None
        self.ls_1 = LayerScale(cfg.width) if use_ls else nn.Identity()
        self.ls_2 = LayerScale(cfg.width) if use_ls else nn.Identity()

    def forward(self, x, cu_seqlens, cos, sin, attn_fn: VisionAttentionFn) -> torch.Tensor:
        x = x + self.ls_1(self.attn(self.ln_1(x), cu_seqlens, cos, sin, attn_fn))
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualBlock(cfg) for _ in range(cfg.layers))


class VisionEncoder(nn.Module):
    """pixels [B, 3, S, S] → downsampled patch features [B, (S/patch/4)^2, 4·width].

    Key names match the checkpoint's `vision_model.*` tensors. The two stride-2 downsampler convs belong to
    this module in the checkpoint, so they live here; the linear projector is a sibling in the full model.
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.conv1 = nn.Conv2d(cfg.num_channels, w, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.grid_size ** 2, w))
        self.ln_pre = nn.LayerNorm(w, eps=cfg.layer_norm_eps) if cfg.use_ln_pre else nn.Identity()
        self.transformer = VisionTransformer(cfg)
        self.vit_downsampler1 = nn.Conv2d(w, 2 * w, kernel_size=3, stride=2, padding=1)
        self.vit_downsampler2 = nn.Conv2d(2 * w, 4 * w, kernel_size=3, stride=2, padding=1)

    def positions_for(self, grid: int) -> torch.Tensor:
        """Learned positions for a grid×grid image: bilinear (align_corners=False) from the native grid."""
        native = self.cfg.grid_size
        pos = self.positional_embedding
        if grid == native:
            return pos
        square = pos.float().T.reshape(1, -1, native, native)
        resized = F.interpolate(square, size=(grid, grid), mode="bilinear", align_corners=False)
        return resized.reshape(-1, grid * grid).T.to(pos.dtype)

    def forward(self, pixels: torch.Tensor, attn_fn: VisionAttentionFn = sdpa_vision_attention) -> torch.Tensor:
        cfg = self.cfg
        b, _, size, size2 = pixels.shape
        if size != size2 or size % cfg.patch_size:
            raise ValueError(f"vision encoder: views must be square multiples of {cfg.patch_size} px, got {size}×{size2}")
        grid = size // cfg.patch_size
        x = self.conv1(pixels.to(self.conv1.weight.dtype)).flatten(2).transpose(1, 2)  # [B, N, W]
        if cfg.use_abs_posemb:
            x = x + self.positions_for(grid)
        x = self.ln_pre(x)
        n = grid * grid
        cos, sin = vision_rope_cos_sin(grid, cfg.head_dim, cfg.rope_theta)
        if not cfg.use_rope2d:
            cos, sin = torch.ones_like(cos), torch.zeros_like(sin)
        cos, sin = cos.to(x.device).repeat(b, 1), sin.to(x.device).repeat(b, 1)
        cu_seqlens = torch.arange(0, (b + 1) * n, n, dtype=torch.int32, device=x.device)
        x = x.reshape(b * n, -1)
        for block in self.transformer.resblocks:
            x = block(x, cu_seqlens, cos, sin, attn_fn)
        return self.downsample(x.view(b, grid, grid, -1))

    def downsample(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2)  # [B, W, G, G]
        x = self.vit_downsampler2(self.vit_downsampler1(x))
        return x.flatten(2).transpose(1, 2)  # row-major tokens


def tokens_per_view(image_size: int, patch_size: int) -> int:
    grid = math.ceil(math.ceil(image_size // patch_size / 2) / 2)
    return grid * grid

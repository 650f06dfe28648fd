"""Vision tower + downsamplers + projector against an independent plain-PyTorch reference.

The reference below is written from MODEL.md's formulas, not from step3vl's code: patch embedding as an
explicit unfold+matmul, learned positions (bilinearly interpolated from the native 52×52 grid for 36×36
crops), hand-written LayerNorm, per-head attention loops with 2-D RoPE built as complex rotations from the
spec, LayerScale, the activation from the config, the two stride-2 convs via unfold+matmul, and the linear
projector. It runs in float64 and reads the weights from the model's state_dict.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from step3vl.config import Step3VLConfig
from step3vl.model import ImagePixels, Step3VLForCausalLM
from step3vl.model.rope import apply_interleaved, vision_rope_cos_sin

WIDTH, HEADS, LAYERS, PATCH = 32, 2, 2, 14
HEAD_DIM = WIDTH // HEADS
THETA = 10000.0


def _config(hidden_act: str = "quick_gelu", use_rope2d: bool = True) -> Step3VLConfig:
    vision = dict(width=WIDTH, layers=LAYERS, heads=HEADS, num_channels=3, image_size=728, patch_size=PATCH,
                  mlp_ratio=2.0, hidden_act=hidden_act, layer_norm_eps=1e-5, ues_cls_token=False, use_ln_pre=True,
                  use_ln_post=False, use_abs_posemb=True, use_rope2d=use_rope2d, ls_init_value=0.1,
                  rope_theta=THETA)
    text = dict(model_type="qwen3", vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, head_dim=24)
    return Step3VLConfig.from_dict(dict(model_type="step_robotics", vision_config=vision, text_config=text,
                                        understand_projector_stride=2, projector_bias=False, image_token_id=63))


def _model(hidden_act: str = "quick_gelu", use_rope2d: bool = True, seed: int = 0) -> Step3VLForCausalLM:
    model = Step3VLForCausalLM(_config(hidden_act, use_rope2d)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma") or (p.dim() == 1 and "ln_" in name and name.endswith("weight")):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))  # per-channel, not a constant
            elif "positional_embedding" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel() if p.dim() > 1 else WIDTH
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
    return model


# ------------------------------------------------------------------------------------------------
# The reference (float64)


def _layer_norm(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def _act(x, name):
    if name == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    if name == "gelu":
        return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
    raise AssertionError(name)


def _rope_angles(grid: int) -> torch.Tensor:
    """[grid*grid, HEAD_DIM/2] rotation angle of each adjacent pair (2i, 2i+1), row-major patches."""
    half = HEAD_DIM // 2
    freqs = [1.0 / THETA ** (2 * j / half) for j in range(half // 2)]  # 1/theta^(arange(0, half, 2)/half)
    angles = torch.empty(grid * grid, HEAD_DIM // 2, dtype=torch.float64)
    for r in range(grid):
        for c in range(grid):
            # First half of the head: pairs rotated by the column; second half: by the row.
            angles[r * grid + c] = torch.tensor([c * f for f in freqs] + [r * f for f in freqs], dtype=torch.float64)
    return angles


def _rotate_pairs(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """x [N, D]: (x0, x1) → (x0·cos − x1·sin, x1·cos + x0·sin), as a complex multiplication."""
    z = torch.complex(x[:, 0::2], x[:, 1::2]) * torch.polar(torch.ones_like(angles), angles)
    return torch.stack([z.real, z.imag], dim=-1).flatten(1)


def _conv_s2(x, w, b):
    """Conv2d(k3, s2, p1) on [C, G, G] via unfold + matmul."""
    g = x.shape[-1]
    out = (g + 2 - 3) // 2 + 1
    cols = F.unfold(x[None], kernel_size=3, padding=1, stride=2)[0]  # [C*9, out*out]
    return (w.reshape(w.shape[0], -1) @ cols + b[:, None]).reshape(-1, out, out)


def reference_view(sd: dict, pixels: torch.Tensor, act: str, rope: bool = True) -> torch.Tensor:
    """One view [3, S, S] → [tokens, hidden] following MODEL.md."""
    sd = {k: v.double() for k, v in sd.items()}
    x = pixels.double()
    grid = x.shape[-1] // PATCH
    # Patch embed without bias: each patch flattened (c, dy, dx) dotted with the conv kernel.
    patches = x.reshape(3, grid, PATCH, grid, PATCH).permute(1, 3, 0, 2, 4).reshape(grid * grid, -1)
    h = patches @ sd["vision_model.conv1.weight"].reshape(WIDTH, -1).T
    pos = sd["vision_model.positional_embedding"]
    if grid != 52:
        pos = F.interpolate(pos.T.reshape(1, WIDTH, 52, 52), size=(grid, grid), mode="bilinear",
                            align_corners=False).reshape(WIDTH, grid * grid).T
    h = h + pos
    h = _layer_norm(h, sd["vision_model.ln_pre.weight"], sd["vision_model.ln_pre.bias"])
    angles = _rope_angles(grid) if rope else torch.zeros(grid * grid, HEAD_DIM // 2, dtype=torch.float64)
    for i in range(LAYERS):
        p = f"vision_model.transformer.resblocks.{i}."
        y = _layer_norm(h, sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
        qkv = y @ sd[p + "attn.in_proj_weight"].T + sd[p + "attn.in_proj_bias"]
        q, k, v = qkv[:, :WIDTH], qkv[:, WIDTH:2 * WIDTH], qkv[:, 2 * WIDTH:]
        heads = []
        for hd in range(HEADS):
            sl = slice(hd * HEAD_DIM, (hd + 1) * HEAD_DIM)
            qh, kh = _rotate_pairs(q[:, sl], angles), _rotate_pairs(k[:, sl], angles)
            att = torch.softmax(qh @ kh.T / math.sqrt(HEAD_DIM), dim=-1)  # non-causal
            heads.append(att @ v[:, sl])
        a = torch.cat(heads, dim=1) @ sd[p + "attn.out_proj.weight"].T + sd[p + "attn.out_proj.bias"]
        h = h + sd[p + "ls_1.gamma"] * a
        y = _layer_norm(h, sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
        m = _act(y @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"], act)
        h = h + sd[p + "ls_2.gamma"] * (m @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"])
    fmap = h.T.reshape(WIDTH, grid, grid)  # token r*grid+c → (r, c)
    fmap = _conv_s2(fmap, sd["vision_model.vit_downsampler1.weight"], sd["vision_model.vit_downsampler1.bias"])
    fmap = _conv_s2(fmap, sd["vision_model.vit_downsampler2.weight"], sd["vision_model.vit_downsampler2.bias"])
    tokens = fmap.reshape(fmap.shape[0], -1).T  # row-major
    return tokens @ sd["vit_large_projector.weight"].T


# ------------------------------------------------------------------------------------------------


def _pixels(n: int, size: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("size,tokens", [(728, 169), (504, 81)], ids=["global728", "crop504"])
@torch.inference_mode()
def test_encode_views_matches_reference(size, tokens):
    """Two views in one batch (they must not see each other); 504 uses interpolated learned positions."""
    act = "quick_gelu"  # test_activation_follows_config covers gelu against the reference
    model = _model(act)
    sd = model.state_dict()
    pixels = _pixels(2, size, seed=size)
    got = model.encode_views(pixels)
    assert got.shape == (2, tokens, 48) and got.dtype == torch.float32
    for b in range(2):
        ref = reference_view(sd, pixels[b], act)
        assert ref.abs().max() > 0.5
        torch.testing.assert_close(got[b].double(), ref, atol=2e-5, rtol=1e-5)


@torch.inference_mode()
def test_activation_follows_config():
    """quick_gelu and gelu checkpoints with the same weights differ, and each matches its own formula only."""
    quick, exact = _model("quick_gelu"), _model("gelu")
    exact.load_state_dict(quick.state_dict())
    pixels = _pixels(1, 504, seed=1)
    out_q, out_e = quick.encode_views(pixels)[0].double(), exact.encode_views(pixels)[0].double()
    ref_e = reference_view(exact.state_dict(), pixels[0], "gelu")
    torch.testing.assert_close(out_e, ref_e, atol=2e-5, rtol=1e-5)
    assert (out_q - ref_e).abs().max() > 1e-2
    assert (out_q - out_e).abs().max() > 1e-2


@torch.inference_mode()
def test_bf16_close_to_fp32():
    model = _model()
    pixels = _pixels(1, 504, seed=2)
    ref = model.encode_views(pixels)
    got = model.to(torch.bfloat16).encode_views(pixels)
    assert got.dtype == torch.bfloat16
    assert (got.float() - ref).abs().max() <= 0.05 * ref.abs().max()


def test_rope_identity_at_origin():
    cos, sin = vision_rope_cos_sin(36, HEAD_DIM, THETA)
    assert cos.shape == sin.shape == (36 * 36, HEAD_DIM)
    x = torch.randn(1, HEADS, HEAD_DIM)
    torch.testing.assert_close(apply_interleaved(x, cos[:1], sin[:1]), x, atol=0, rtol=0)


def test_rope_hand_checked_positions():
    """Patch (row 0, col 1) turns the first pair by 1 rad and leaves the row half alone; (row 1, col 0) the reverse."""
    grid = 4
    cos, sin = vision_rope_cos_sin(grid, HEAD_DIM, THETA)
    x = torch.randn(1, 1, HEAD_DIM, dtype=torch.float32)
    half = HEAD_DIM // 2
    c1, s1 = math.cos(1.0), math.sin(1.0)
    col1 = apply_interleaved(x, cos[1:2], sin[1:2])[0, 0]  # patch index 1 = (row 0, col 1)
    x0, x1 = x[0, 0, 0].item(), x[0, 0, 1].item()
    assert col1[0].item() == pytest.approx(x0 * c1 - x1 * s1, abs=1e-6)
    assert col1[1].item() == pytest.approx(x1 * c1 + x0 * s1, abs=1e-6)
    torch.testing.assert_close(col1[half:], x[0, 0, half:])
    row1 = apply_interleaved(x, cos[grid:grid + 1], sin[grid:grid + 1])[0, 0]  # patch index grid = (row 1, col 0)
    torch.testing.assert_close(row1[:half], x[0, 0, :half])
    x0, x1 = x[0, 0, half].item(), x[0, 0, half + 1].item()
    assert row1[half].item() == pytest.approx(x0 * c1 - x1 * s1, abs=1e-6)
    assert row1[half + 1].item() == pytest.approx(x1 * c1 + x0 * s1, abs=1e-6)
    # The last pair of each half turns slowest: angle = position / theta^((half-2)/half).
    slow = 1.0 / THETA ** ((half - 2) / half)
    assert math.asin(sin[1, half - 1].item()) == pytest.approx(slow, rel=1e-4)


def _patch_features(model: Step3VLForCausalLM, pixels: torch.Tensor) -> torch.Tensor:
    """The transformer's output grid [B, W, G, G] (the downsamplers' input), captured with a hook."""
    seen = {}
    hook = model.vision_model.vit_downsampler1.register_forward_hook(lambda m, i, o: seen.update(x=i[0]))
    try:
        model.encode_views(pixels)
    finally:
        hook.remove()
    return seen["x"]


def _permute_patches(pixels: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Shuffle the 14×14 patches of [B, 3, S, S] by `perm` over the row-major patch index."""
    b, c, s, _ = pixels.shape
    g = s // PATCH
    p = pixels.reshape(b, c, g, PATCH, g, PATCH).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, c, PATCH, PATCH)
    return p[:, perm].reshape(b, g, g, c, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5).reshape(b, c, s, s)


@torch.inference_mode()
@pytest.mark.parametrize("use_rope2d", [True, False])
def test_permuted_patch_grid(use_rope2d):
    """With the learned positions zeroed, only 2-D RoPE tells patches apart: with it a permuted grid gives
    different features; without it the transformer is permutation-equivariant (proves the check can fail)."""
    model = _model(use_rope2d=use_rope2d)
    with torch.no_grad():
        model.vision_model.positional_embedding.zero_()
    pixels = _pixels(1, 504, seed=3)
    g = 504 // PATCH
    perm = torch.randperm(g * g, generator=torch.Generator().manual_seed(0))
    base = _patch_features(model, pixels).flatten(2)[..., perm]
    moved = _patch_features(model, _permute_patches(pixels, perm)).flatten(2)
    if use_rope2d:
        assert (moved - base).abs().max() > 1e-2
    else:
        torch.testing.assert_close(moved, base, atol=1e-5, rtol=1e-5)
    # Through the whole tower (learned positions back, downsamplers, projector) the output changes too.
    full = _model()
    assert (full.encode_views(_permute_patches(pixels, perm)) - full.encode_views(pixels)).abs().max() > 1e-2


@torch.inference_mode()
def test_encode_images_orders_crops_then_global():
    model = _model()
    crops = _pixels(2, 504, seed=4)
    glob = _pixels(1, 728, seed=5)[0]
    other = ImagePixels(global_view=_pixels(1, 728, seed=6)[0], crops=torch.empty(0, 3, 504, 504))
    feats = model.encode_images([ImagePixels(global_view=glob, crops=crops), other])
    assert [f.shape for f in feats] == [(2 * 81 + 169, 48), (169, 48)]
    expect = torch.cat([model.encode_views(crops).flatten(0, 1), model.encode_views(glob[None])[0]])
    torch.testing.assert_close(feats[0], expect, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(feats[1], model.encode_views(other.global_view[None])[0], atol=1e-5, rtol=1e-5)


def test_rejects_non_square_views():
    model = _model()
    with pytest.raises(ValueError, match="square"):
        model.encode_views(torch.zeros(1, 3, 504, 490))

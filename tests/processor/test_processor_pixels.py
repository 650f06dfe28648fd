"""Pixel values of the preprocessed views against hand-computed expectations (MODEL.md step 5)."""

import numpy as np
import torch
from PIL import Image

from step3vl.processor import preprocess_image

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def norm(rgb) -> torch.Tensor:
    """[3] normalized value of an 8-bit colour, computed in float32 like the pipeline."""
    v = torch.tensor(rgb, dtype=torch.float32) / 255
    return (v - torch.tensor(MEAN, dtype=torch.float32)) / torch.tensor(STD, dtype=torch.float32)


def filled(t: torch.Tensor, rgb) -> torch.Tensor:
    """A tensor shaped like t ([3,H,W]) holding the normalized colour everywhere."""
    return norm(rgb).view(3, 1, 1).expand_as(t)


def test_solid_colour_exact_without_resize():
    c = (200, 100, 50)
    v = preprocess_image(Image.new("RGB", (728, 728), c))
    assert v.global_view.shape == (3, 728, 728) and v.global_view.dtype == torch.float32
    assert v.crops.shape == (0, 3, 504, 504) and v.grid == (0, 0)
    assert torch.equal(v.global_view, filled(v.global_view, c))


def test_solid_colour_resized_views_stay_constant():
    c = (17, 240, 129)
    v = preprocess_image(Image.new("RGB", (300, 480), c))  # window 300: crops resized 300 → 504
    assert v.grid == (2, 1) and v.crops.shape == (2, 3, 504, 504)
    torch.testing.assert_close(v.global_view, filled(v.global_view, c), atol=1e-5, rtol=0)
    for crop in v.crops:
        torch.testing.assert_close(crop, filled(crop, c), atol=1e-5, rtol=0)


def test_crops_row_by_row_exact():
    # 1512×1008 is already the crop canvas (3×2 windows of 504): each window its own colour.
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]
    a = np.zeros((1008, 1512, 3), np.uint8)
    for k, col in enumerate(colours):
        r, c = divmod(k, 3)
        a[r * 504 : (r + 1) * 504, c * 504 : (c + 1) * 504] = col
    v = preprocess_image(a)
    assert v.grid == (2, 3) and v.crops.shape == (6, 3, 504, 504)
    for k, col in enumerate(colours):
        assert torch.equal(v.crops[k], filled(v.crops[k], col)), f"crop {k}"
    # Global view is the whole image squeezed to 728×728: block centres keep their colours.
    for k, col in enumerate(colours):
        r, c = divmod(k, 3)
        y, x = int((r + 0.5) * 728 / 2), int((c + 0.5) * 728 / 3)
        torch.testing.assert_close(v.global_view[:, y, x], norm(col), atol=1e-5, rtol=0)


def test_orientation_left_right_and_top_bottom():
    a = np.zeros((400, 1000, 3), np.uint8)  # h=400, w=1000; global view is squeezed non-proportionally
    a[:200, :500] = (255, 0, 0)  # top-left red
    a[:200, 500:] = (0, 255, 0)  # top-right green
    a[200:, :] = (0, 0, 255)  # bottom blue
    v = preprocess_image(a)
    g = v.global_view
    torch.testing.assert_close(g[:, 100, 100], norm((255, 0, 0)), atol=1e-5, rtol=0)
    torch.testing.assert_close(g[:, 100, 600], norm((0, 255, 0)), atol=1e-5, rtol=0)
    torch.testing.assert_close(g[:, 600, 364], norm((0, 0, 255)), atol=1e-5, rtol=0)
    # Crops (1×2): left crop holds the red quadrant, right crop the green one.
    torch.testing.assert_close(v.crops[0][:, 50, 50], norm((255, 0, 0)), atol=1e-5, rtol=0)
    torch.testing.assert_close(v.crops[1][:, 50, 450], norm((0, 255, 0)), atol=1e-5, rtol=0)


def test_short_side_crop_overhang_is_zero_filled():
    c = (255, 255, 255)
    v = preprocess_image(Image.new("RGB", (1000, 400), c))  # canvas 1008×400, crops 504 tall
    assert v.grid == (1, 2)
    for crop in v.crops:
        assert torch.equal(crop[:, :400], filled(crop[:, :400], c))
        assert torch.equal(crop[:, 400:], filled(crop[:, 400:], (0, 0, 0)))


def test_tiny_extreme_image_padded_top_left():
    c = (255, 255, 255)
    v = preprocess_image(Image.new("RGB", (20, 200), c))  # → 200×200 canvas, image in columns 0..19
    assert v.grid == (0, 0) and v.crops.shape[0] == 0
    g = v.global_view  # columns scale by 728/200: the image covers x < 72.8
    torch.testing.assert_close(g[:, :, :68], filled(g[:, :, :68], c), atol=1e-5, rtol=0)
    torch.testing.assert_close(g[:, :, 78:], filled(g[:, :, 78:], (0, 0, 0)), atol=1e-5, rtol=0)


def test_grayscale_replicated():
    a = np.tile(np.arange(0, 256, 2, dtype=np.uint8), (128, 1))  # 128×128 horizontal ramp
    v = preprocess_image(Image.fromarray(a, mode="L"))
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    raw = v.global_view * std + mean  # back to [0,1]: all three channels must agree
    torch.testing.assert_close(raw[0], raw[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(raw[0], raw[2], atol=1e-5, rtol=0)


def _antialias_halving_matrix(n: int) -> np.ndarray:
    """Bilinear antialiased 2× downscale: taps [1,3,3,1]/8 per axis, renormalized at the edges."""
    w = np.zeros((n // 2, n))
    for i in range(n // 2):
        for j, t in zip(range(2 * i - 1, 2 * i + 3), (1, 3, 3, 1)):
            if 0 <= j < n:
                w[i, j] = t
        w[i] /= w[i].sum()
    return w


def test_global_view_is_antialiased_resize_of_normalized_image():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (1456, 1456, 3), dtype=np.uint8)  # global view: exact 2× downscale
    v = preprocess_image(a)
    x = (a.astype(np.float64) / 255 - np.array(MEAN)) / np.array(STD)  # [H, W, 3]
    m = _antialias_halving_matrix(1456)
    ref = np.stack([m @ x[:, :, c] @ m.T for c in range(3)])
    np.testing.assert_allclose(v.global_view.numpy(), ref, atol=2e-5, rtol=0)
    assert v.grid == (3, 3)  # 1456/504 = 2.89 → 3 windows per side


def test_large_image_scaled_and_cut():
    v = preprocess_image(Image.new("RGB", (4000, 3000), (9, 99, 199)))
    assert v.size == (4000, 3000)
    assert v.grid == (5, 6) and v.crops.shape == (30, 3, 504, 504)
    assert v.global_view.shape == (3, 728, 728)
    torch.testing.assert_close(v.crops[-1], filled(v.crops[-1], (9, 99, 199)), atol=1e-5, rtol=0)


def test_extreme_ratio_views():
    v = preprocess_image(Image.new("RGB", (200, 4000), (50, 60, 70)))  # → 151×3024, window 151
    assert v.grid == (20, 1) and v.crops.shape == (20, 3, 504, 504)  # 151-px windows resized to 504
    torch.testing.assert_close(v.crops[7], filled(v.crops[7], (50, 60, 70)), atol=1e-5, rtol=0)

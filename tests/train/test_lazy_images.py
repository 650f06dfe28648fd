"""Lazily loaded training images: the token layout from the file header up front, the same pixels as eager
preprocessing when a step encodes them, released after it; bad files fail when the data is loaded."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from step3vl.processor import ImageError, preprocess_image
from step3vl.processor.image import LazyImageViews
from step3vl.train import PretrainConfig, Pretrainer, load_examples, pack
from step3vl.train.logprobs import target_logprobs


def _png(path, size=(900, 300), seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
    Image.fromarray(pixels).save(path)
    return path


def test_lazy_views_equal_eager_preprocessing_and_release(tmp_path):
    path = _png(tmp_path / "wide.png")  # wide enough for crops
    eager = preprocess_image(path)
    lazy = LazyImageViews(str(path))
    assert lazy.size == eager.size and lazy.grid == eager.grid and lazy.num_crops == eager.num_crops > 0
    assert lazy._views is None  # nothing decoded yet
    assert torch.equal(lazy.global_view, eager.global_view) and torch.equal(lazy.crops, eager.crops)
    lazy.release()
    assert lazy._views is None


def test_header_only_planning_and_errors_naming_the_file(tmp_path):
    path = _png(tmp_path / "cut.png")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # header intact, pixel data truncated
    lazy = LazyImageViews(path)  # planning reads the header only
    with pytest.raises(ImageError, match="cut.png"):
        lazy.global_view
    with pytest.raises(ImageError, match="image file not found: .*missing.png"):
        LazyImageViews(tmp_path / "missing.png")
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(ImageError, match="junk.png"):
        LazyImageViews(tmp_path / "junk.png")


def test_lazy_examples_train_like_eager_ones_and_free_their_pixels(tmp_path, processor, tiny_ckpt):
    from step3vl.loader import load_model

    img = _png(tmp_path / "a.png", size=(120, 80))
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "a red square", "images": [str(img)]}) + "\n" +
                    json.dumps({"messages": [{"role": "user", "content": [{"type": "image", "image": str(img)},
                                                                          {"type": "text", "text": "What?"}]},
                                             {"role": "assistant", "content": "Noise."}]}) + "\n")
    lazy = load_examples(processor, data)
    eager = load_examples(processor, data, lazy_images=False)
    assert all(isinstance(im, LazyImageViews) for ex in lazy for im in ex.images)
    assert [ex.input_ids for ex in lazy] == [ex.input_ids for ex in eager]
    assert [ex.image_positions for ex in lazy] == [ex.image_positions for ex in eager]
    model = load_model(tiny_ckpt, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(target_logprobs(model, pack(lazy)), target_logprobs(model, pack(eager)),
                                   rtol=0, atol=0)
    Pretrainer(model, PretrainConfig(shuffle=False)).fit(lazy)
    assert all(im._views is None for ex in lazy for im in ex.images)  # released after the step

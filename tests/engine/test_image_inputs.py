"""The pieces of engine/image_inputs.py on their own: the encoder cache's LRU accounting, an image's row count
against the encoder's output, and the prefix-cache ids of a prompt with images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from step3vl.engine.image_inputs import (EncoderCache, cache_token_ids, image_hash, image_layout, image_rows)
from step3vl.loader import load_model
from step3vl.processor import IMAGE_PLACEHOLDER, Step3VLProcessor


def _t(rows: int) -> torch.Tensor:
    return torch.zeros(rows, 4)  # 16 bytes per row


def test_encoder_cache_evicts_least_recently_used_within_capacity():
    cache = EncoderCache(capacity=10 * 16)
    cache.put(1, _t(4))
    cache.put(2, _t(4))
    assert cache.get(1) is not None  # 1 is now the most recent
    cache.put(3, _t(4))  # 12 rows > 10: evicts 2, the least recently used
    assert cache.get(2) is None and cache.get(1) is not None and cache.get(3) is not None
    assert cache.used == 8 * 16
    cache.put(4, _t(11))  # larger than the whole cache: not kept, nothing evicted
    assert cache.get(4) is None and set(cache.entries) == {1, 3}
    cache.put(1, _t(2))  # an existing key keeps its first value
    assert cache.get(1).shape[0] == 4 and cache.used == 8 * 16
    empty = EncoderCache(0)
    empty.put(5, _t(1))
    assert empty.get(5) is None and empty.used == 0


@pytest.fixture(scope="module")
def tiny(tiny_ckpt):
    return load_model(tiny_ckpt, dtype=torch.float32), Step3VLProcessor.from_pretrained(tiny_ckpt)


def _image(seed: int, size) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_image_rows_equal_the_encoder_output_and_the_prompt(tiny):
    model, processor = tiny
    images = [_image(0, (64, 48)), _image(1, (300, 40)), _image(2, (20, 20))]
    p = processor.process(f"a {IMAGE_PLACEHOLDER} b {IMAGE_PLACEHOLDER} c {IMAGE_PLACEHOLDER}", images)
    assert any(im.crops.shape[0] for im in p.images)  # the wide image is cropped: crops are counted too
    with torch.inference_mode():
        feats = model.encode_images(p.images)
    assert [image_rows(model, im) for im in p.images] == [f.shape[0] for f in feats]
    layout = image_layout(model, p.input_ids, p.images)
    assert layout.spans[-1][1] == p.input_ids.count(model.cfg.image_token_id)

    ids = cache_token_ids(p.input_ids, layout)
    hashes = [image_hash(im) for im in p.images]
    assert len(set(hashes)) == 3 and layout.hashes == hashes
    image_id = model.cfg.image_token_id
    rows = [i for i, t in enumerate(p.input_ids) if t == image_id]
    assert all(ids[i] == t for i, t in enumerate(p.input_ids) if t != image_id)  # text untouched
    for k, (lo, hi) in enumerate(layout.spans):  # each image's rows carry that image's digest, and only them
        assert {ids[r] for r in rows[lo:hi]} == {-1 - hashes[k]}


def test_image_hash_follows_the_pixels(tiny):
    _, processor = tiny
    a, b = _image(3, (64, 48)), _image(4, (64, 48))
    pa, pa2, pb = (processor.process(IMAGE_PLACEHOLDER, [im]).images[0] for im in (a, a.copy(), b))
    assert image_hash(pa) == image_hash(pa2) != image_hash(pb)

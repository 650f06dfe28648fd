"""End to end on the generated tiny checkpoint: image + question → processor → vision → decoder → logits.

The decoder part is checked against transformers' Qwen3ForCausalLM fed `inputs_embeds` that this test builds
itself (token embeddings, with the image features written at the `<im_patch>` positions the processor laid out),
so a feature landing on the wrong position, or in the wrong order, fails.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen3Config, Qwen3ForCausalLM

from step3vl.loader import load_model
from step3vl.model import DenseAttention
from step3vl.processor import Step3VLProcessor

QUESTION = "What is in the picture? Answer step by step."


def _image(seed: int, size=(900, 600)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _messages(image) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": "Look at this."}, {"type": "image", "image": image},
                                         {"type": "text", "text": QUESTION}]}]


@pytest.fixture(scope="module")
def processor(tiny_ckpt):
    return Step3VLProcessor.from_pretrained(tiny_ckpt)


@pytest.fixture(scope="module")
def model32(tiny_ckpt):
    return load_model(tiny_ckpt, dtype=torch.float32)


@torch.inference_mode()
def _run(model, processed) -> tuple[torch.Tensor, torch.Tensor]:
    """→ (logits [T, V] fp32, image features [N, hidden])."""
    ids = torch.tensor(processed.input_ids)
    feats = torch.cat(model.encode_images(processed.images))
    hidden = model(ids, torch.arange(len(ids)), DenseAttention([len(ids)]), image_features=feats)
    return model.compute_logits(hidden).float(), feats


def _hf_decoder(model) -> Qwen3ForCausalLM:
    t = model.cfg.text
    cfg = Qwen3Config(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                      num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                      num_key_value_heads=t.num_key_value_heads, head_dim=t.head_dim, rms_norm_eps=t.rms_norm_eps,
                      rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta},
                      max_position_embeddings=t.max_position_embeddings, tie_word_embeddings=False)
    hf = Qwen3ForCausalLM(cfg).eval()
    state = {k: v for k, v in model.state_dict().items() if k.startswith(("model.", "lm_head."))}
    hf.load_state_dict(state, strict=True)
    return hf


def test_token_layout(processor, model32):
    processed = processor(_messages(_image(0)))
    im_patch = processor.image_token_id
    assert im_patch == model32.cfg.image_token_id
    (start, end), = processed.image_spans
    views = processed.images[0]
    assert views.grid == (1, 2) and views.crops.shape == (2, 3, 504, 504)
    assert end - start == 2 * (81 + 2) + 169 + 2  # two crops, one row, then the global view
    assert processed.input_ids.count(im_patch) == 2 * 81 + 169
    assert processed.input_ids[start] != im_patch and processed.input_ids[start + 1] == im_patch


@torch.inference_mode()
def test_image_features_land_on_im_patch_positions(processor, model32):
    processed = processor(_messages(_image(0)))
    logits, feats = _run(model32, processed)
    ids = torch.tensor(processed.input_ids)
    slots = [i for i, t in enumerate(processed.input_ids) if t == processor.image_token_id]
    assert feats.shape == (len(slots), model32.cfg.text.hidden_size)
    # The embeddings: features at the slots in order (crops row by row, then global), token rows elsewhere.
    emb = model32.embed(ids, feats)
    table = model32.model.embed_tokens.weight
    torch.testing.assert_close(emb[slots], feats, atol=0, rtol=0)
    others = [i for i in range(len(ids)) if i not in set(slots)]
    torch.testing.assert_close(emb[others], table[ids[others]], atol=0, rtol=0)
    # The logits: transformers' Qwen3 over embeddings built here, independently of step3vl's `embed`.
    inputs_embeds = table[ids].clone()
    inputs_embeds[torch.tensor(slots)] = feats
    ref = _hf_decoder(model32)(inputs_embeds=inputs_embeds[None], use_cache=False).logits[0]
    assert logits.shape == (len(ids), model32.cfg.text.vocab_size)
    assert (logits - ref).abs().max().item() <= 1e-5


@torch.inference_mode()
def test_changing_the_image_changes_only_later_logits(processor, model32):
    a, b = processor(_messages(_image(0))), processor(_messages(_image(1)))
    assert a.input_ids == b.input_ids  # same size → same layout
    first = a.input_ids.index(processor.image_token_id)
    la, fa = _run(model32, a)
    lb, fb = _run(model32, b)
    assert (fa - fb).abs().max() > 1e-3
    torch.testing.assert_close(la[:first], lb[:first], atol=1e-6, rtol=0)
    changed = (la[first:] - lb[first:]).abs().amax(dim=-1)
    assert changed.min() > 1e-6 and changed.max() > 1e-3
    # Changing one crop only moves that crop's features: the other crop's rows stay put.
    crop_a, crop_b = fa[:81], fb[:81]
    assert (crop_a - crop_b).abs().max() > 1e-3
    c = processor(_messages(_image(0)))
    c.images[0].crops[1] = b.images[0].crops[1]
    _, fc = _run(model32, c)
    torch.testing.assert_close(fc[:81], fa[:81], atol=1e-5, rtol=0)
    torch.testing.assert_close(fc[81:162], fb[81:162], atol=1e-5, rtol=0)


@torch.inference_mode()
def test_bf16_end_to_end(processor, model32, tiny_ckpt):
    processed = processor(_messages(_image(2)))
    model16 = load_model(tiny_ckpt, dtype=torch.bfloat16)
    logits16, feats16 = _run(model16, processed)
    logits32, feats32 = _run(model32, processed)
    assert feats16.dtype == torch.bfloat16 and torch.isfinite(logits16).all()
    assert (feats16.float() - feats32).abs().max() <= 0.02 * feats32.abs().max()
    assert (logits16 - logits32).abs().max() <= 0.02 * logits32.abs().max()
    # Same argmax on the large majority of positions: bf16 did not scramble the computation.
    assert (logits16.argmax(-1) == logits32.argmax(-1)).float().mean() > 0.9


@torch.inference_mode()
def test_packed_requests_match_separate_runs(processor, model32):
    """An image request packed with a text-only request gives each its own logits."""
    img = processor(_messages(_image(3)))
    txt = processor([{"role": "user", "content": QUESTION}])
    assert processor.image_token_id not in txt.input_ids
    alone_img, feats = _run(model32, img)
    ids_txt = torch.tensor(txt.input_ids)
    alone_txt = model32.compute_logits(model32(ids_txt, torch.arange(len(ids_txt)), DenseAttention([len(ids_txt)])))
    ids = torch.tensor(txt.input_ids + img.input_ids)
    positions = torch.cat([torch.arange(len(txt.input_ids)), torch.arange(len(img.input_ids))])
    packed = model32.compute_logits(
        model32(ids, positions, DenseAttention([len(txt.input_ids), len(img.input_ids)]), image_features=feats))
    torch.testing.assert_close(packed[:len(txt.input_ids)], alone_txt, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[len(txt.input_ids):], alone_img, atol=1e-5, rtol=0)


def test_feature_count_mismatch_is_an_error(processor, model32):
    processed = processor(_messages(_image(0)))
    ids = torch.tensor(processed.input_ids)
    with pytest.raises(ValueError, match=r"331 <im_patch> tokens .* but 330"):
        model32.embed(ids, torch.zeros(330, model32.cfg.text.hidden_size))
    with pytest.raises(ValueError, match="but 0"):
        model32.embed(ids)

"""Image requests through the engine: a dict prompt with images and a placeholder, and `llm.chat` with an image
content part, against the model run densely (the processor's ids, the encoder's features on the <im_patch>
rows, greedy by full recomputation). Prompts equal in ids but with other images never share cache blocks,
an image is encoded once per request, and preemption / chunked prefill do not move the outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from step3vl import LLM, SamplingParams
from step3vl.processor import IMAGE_PLACEHOLDER, Step3VLProcessor

TEXT = f"Look: {IMAGE_PLACEHOLDER} What is it?"
GREEDY = SamplingParams(n=2, temperature=0.0, max_tokens=6, ignore_eos=True)


def _image(seed: int, size=(64, 48)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def processor(tiny_ckpt) -> Step3VLProcessor:
    return Step3VLProcessor.from_pretrained(tiny_ckpt)


@pytest.fixture(scope="module")
def dense_greedy(tiny_dense, processor):
    """text, image → (prompt ids, dense greedy continuation)."""
    cache = {}

    def run(text: str, image: Image.Image, max_tokens: int = 6) -> tuple[list[int], list[int]]:
        key = (text, image.tobytes(), max_tokens)
        if key not in cache:
            p = processor.process(text, [image])
            with torch.inference_mode():
                feats = torch.cat(tiny_dense.model.encode_images(p.images))
            cache[key] = p.input_ids, tiny_dense.greedy(p.input_ids, max_tokens, feats)
        return cache[key]

    return run


def _llm(ckpt, **kw) -> LLM:
    return LLM(ckpt, dtype="float32", device="cpu", **{"kv_cache_memory": "2MiB", **kw})


def test_dict_prompt_with_images_equals_dense(tiny_ckpt, dense_greedy):
    """Two requests whose ids are identical (same text, same image geometry) but whose images differ: each
    gets its own image's continuation (no prefix-cache or dedup sharing across images)."""
    img_a, img_b = _image(1), _image(2)
    ids_a, want_a = dense_greedy(TEXT, img_a)
    ids_b, want_b = dense_greedy(TEXT, img_b)
    assert ids_a == ids_b and want_a != want_b  # the test only means something if the images matter
    llm = _llm(tiny_ckpt)
    outs = llm.generate([{"prompt": TEXT, "images": [img_a]}, {"prompt": TEXT, "images": [img_b]}], GREEDY,
                        use_tqdm=False)
    for o, ids, want in zip(outs, (ids_a, ids_b), (want_a, want_b)):
        assert o.prompt_token_ids == ids
        assert [c.token_ids for c in o.outputs] == [want, want]
    assert llm.kv_stats()["prefill_tokens_computed"] == 2 * len(ids_a)
    # Again, after both are cached: each image must still hit only its own blocks.
    again = llm.generate([{"prompt": TEXT, "images": [img_b]}], GREEDY, use_tqdm=False)
    assert again[0].outputs[0].token_ids == want_b


def test_chat_with_image_part_equals_dense(tiny_ckpt, processor, dense_greedy):
    img = _image(3)
    messages = [{"role": "user", "content": [{"type": "text", "text": "Look."}, {"type": "image", "image": img},
                                             {"type": "text", "text": "Describe it."}]}]
    text, images = processor.apply_chat_template(messages)
    assert text.count(IMAGE_PLACEHOLDER) == 1 and text.endswith("<|im_start|>assistant\n")
    ids, want = dense_greedy(text, img)
    llm = _llm(tiny_ckpt)
    (o,) = llm.chat(messages, GREEDY, use_tqdm=False)
    assert o.prompt_token_ids == ids
    assert [c.token_ids for c in o.outputs] == [want, want]
    # A batch of conversations.
    outs = llm.chat([messages, [{"role": "user", "content": "Just text."}]], GREEDY, use_tqdm=False)
    assert outs[0].outputs[0].token_ids == want and len(outs) == 2


def test_image_encoded_once_per_request(tiny_ckpt, dense_greedy, monkeypatch):
    """n = 4 samples and a prompt prefilled in 32-token chunks: the encoder runs once for the request."""
    img = _image(4)
    ids, want = dense_greedy(TEXT, img)
    llm = _llm(tiny_ckpt, max_num_batched_tokens=32)
    calls = []
    encode = llm.model.encode_images
    monkeypatch.setattr(llm.model, "encode_images", lambda *a, **k: calls.append(1) or encode(*a, **k))
    (o,) = llm.generate({"prompt": TEXT, "images": [img]},
                        SamplingParams(n=4, temperature=0.0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    assert len(ids) > 5 * 32
    assert [c.token_ids for c in o.outputs] == [want] * 4
    assert len(calls) == 1


def test_image_request_through_preemption(tiny_ckpt):
    """Sampled image request (n = 3) in a pool that forces preemption = the same in a large pool."""
    img = _image(5)
    sp = SamplingParams(n=3, temperature=1.0, top_p=0.9, seed=17, max_tokens=24, ignore_eos=True)
    prompt = {"prompt": TEXT, "images": [img]}
    (big,) = _llm(tiny_ckpt).generate(prompt, sp, use_tqdm=False)
    small = _llm(tiny_ckpt, kv_cache_memory=15 * 8192)  # 15 blocks: 179-token prompt + 3 x 24 tokens do not fit
    (got,) = small.generate(prompt, sp, use_tqdm=False)
    assert small.kv_stats()["preemptions"] > 0
    assert [c.token_ids for c in got.outputs] == [c.token_ids for c in big.outputs]

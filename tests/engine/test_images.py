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


def _dense(tiny_dense, processor, text: str, images: list, max_tokens: int = 6) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy continuation of the model run densely with the images' features)."""
    p = processor.process(text, images)
    with torch.inference_mode():
        feats = torch.cat(tiny_dense.model.encode_images(p.images))
    return p.input_ids, tiny_dense.greedy(p.input_ids, max_tokens, feats)


@pytest.fixture(scope="module")
def dense_greedy(tiny_dense, processor):
    """text, image → (prompt ids, dense greedy continuation)."""
    cache = {}

    def run(text: str, image: Image.Image, max_tokens: int = 6) -> tuple[list[int], list[int]]:
        key = (text, image.tobytes(), max_tokens)
        if key not in cache:
            cache[key] = _dense(tiny_dense, processor, text, [image], max_tokens)
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


def _conversation(img1, img2):
    turn1 = [{"role": "user", "content": [{"type": "image", "image": img1}, {"type": "text", "text": "What is it?"}]}]
    turn2 = turn1 + [{"role": "assistant", "content": "A picture of noise, I think."},
                     {"role": "user", "content": "Are you sure about that?"}]
    turn3 = turn2 + [{"role": "assistant", "content": "Yes."},
                     {"role": "user", "content": [{"type": "image", "image": img2}, {"type": "text", "text": "And this?"}]}]
    return turn1, turn2, turn3


def _common(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@pytest.mark.parametrize("encoder_cache", ["256MiB", 0])
def test_chat_turns_share_image_blocks_and_encode_new_images_only(tiny_ckpt, tiny_dense, processor, encoder_cache):
    """The next turns of a chat: the first image's blocks come from the prefix cache even when the turn adds a
    second image (an image's rows are hashed by its pixels, not by the request's whole image set), and the
    new image is the only one encoded, with or without the encoder cache. The dense model's continuation each time."""
    turns = _conversation(_image(6), _image(7, size=(40, 72)))
    llm = _llm(tiny_ckpt, kv_cache_memory="4MiB", encoder_cache_memory=encoder_cache)
    bs = llm.kv_stats()["block_size"]
    sp = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    encoded, hits, prompts = [], [], []
    for messages in turns:
        ids, want = _dense(tiny_dense, processor, *processor.apply_chat_template(messages))
        before = llm.kv_stats()["prefix_hit_tokens"]
        (o,) = llm.chat(messages, sp, use_tqdm=False)
        assert o.prompt_token_ids == ids and o.outputs[0].token_ids == want
        encoded.append(llm.kv_stats()["images_encoded"])
        hits.append(llm.kv_stats()["prefix_hit_tokens"] - before)
        prompts.append(ids)
    image_id = llm.model.cfg.image_token_id
    last_row_1 = max(p for p, t in enumerate(prompts[0]) if t == image_id)
    assert _common(prompts[1], prompts[2]) - last_row_1 > bs  # image 1 lies in blocks turn 3 can take from turn 2
    assert hits[2] == _common(prompts[1], prompts[2]) // bs * bs
    assert encoded[2] - encoded[1] == 1
    if encoder_cache:
        assert encoded == [1, 1, 2]


def test_encoder_cache_serves_one_picture_to_many_prompts(tiny_ckpt, dense_greedy):
    """Prompts about the same picture, one after another: encoded once, each with its own dense continuation.
    With the cache off, a prompt whose chunk covers image rows encodes again."""
    img = _image(9)
    texts = [f"{IMAGE_PLACEHOLDER} Question {i}?" for i in range(3)]
    for cache, want_encoded in (("256MiB", 1), (0, 3)):
        llm = _llm(tiny_ckpt, kv_cache_memory="4MiB", encoder_cache_memory=cache)
        for text in texts:
            llm.reset_prefix_cache()  # every prompt's image rows must be computed again
            (o,) = llm.generate({"prompt": text, "images": [img]}, GREEDY, use_tqdm=False)
            assert o.outputs[0].token_ids == dense_greedy(text, img)[1]
        stats = llm.kv_stats()
        assert stats["images_encoded"] == want_encoded
        assert stats["encoder_cache_hits"] == (2 if cache else 0)


def test_images_of_a_step_are_encoded_together(tiny_ckpt, dense_greedy):
    """Three image requests admitted in one step go through the encoder in one call; each gets its own image."""
    imgs = [_image(10 + i) for i in range(3)]
    llm = _llm(tiny_ckpt, kv_cache_memory="4MiB", max_num_batched_tokens=2048)
    outs = llm.generate([{"prompt": TEXT, "images": [im]} for im in imgs], GREEDY, use_tqdm=False)
    for o, im in zip(outs, imgs):
        assert [c.token_ids for c in o.outputs] == [dense_greedy(TEXT, im)[1]] * 2
    stats = llm.kv_stats()
    assert (stats["images_encoded"], stats["encoder_calls"]) == (3, 1)
    llm.reset_stats()
    assert (llm.kv_stats()["images_encoded"], llm.kv_stats()["encoder_calls"]) == (0, 0)


def test_encoder_calls_are_bounded_in_views(tiny_ckpt, dense_greedy):
    """A cap on views per encoder call splits a step's images over several calls without changing outputs."""
    imgs = [_image(20 + i) for i in range(3)]
    llm = _llm(tiny_ckpt, kv_cache_memory="4MiB", max_num_batched_tokens=2048)
    llm.engine.runner.images.max_views_per_call = 1
    outs = llm.generate([{"prompt": TEXT, "images": [im]} for im in imgs], GREEDY, use_tqdm=False)
    for o, im in zip(outs, imgs):
        assert o.outputs[0].token_ids == dense_greedy(TEXT, im)[1]
    assert llm.kv_stats()["encoder_calls"] == 3


def test_image_rows_must_match_the_prompt(tiny_ckpt, processor):
    """Images whose rows disagree with the prompt's <im_patch> count are refused when added, naming both."""
    p = processor.process(TEXT, [_image(8)])
    llm = _llm(tiny_ckpt)
    with pytest.raises(ValueError, match=r"<im_patch> tokens .* take \d+ feature rows"):
        llm.engine.add_request("bad", p.input_ids[:-8] + p.input_ids[-4:], SamplingParams(), images=p.images * 2)
    assert "bad" not in llm.engine.requests

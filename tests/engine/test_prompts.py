"""engine/prompts.py on its own: a chat with an image prepares to exactly what the processor gives for the
rendered template (ids, preprocessed views, their digests), and LLM.prepare / LLM.chat go through it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from step3vl.engine import LLM, PreparedPrompt
from step3vl.engine.image_inputs import image_hash
from step3vl.engine.prompts import PromptPreparer, cache_salt, prompt_list
from step3vl.processor import Step3VLProcessor


def _image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def processor(tiny_ckpt) -> Step3VLProcessor:
    return Step3VLProcessor.from_pretrained(tiny_ckpt)


def _messages(img):
    return [{"role": "user", "content": [{"type": "text", "text": "Look."}, {"type": "image", "image": img},
                                         {"type": "text", "text": "What is it?"}]}]


def _same(a: PreparedPrompt, b: PreparedPrompt) -> None:
    assert (a.prompt, a.token_ids, a.salt, a.image_hashes) == (b.prompt, b.token_ids, b.salt, b.image_hashes)
    assert len(a.images) == len(b.images)
    for x, y in zip(a.images, b.images):
        assert torch.equal(x.global_view, y.global_view) and torch.equal(x.crops, y.crops)


def test_chat_with_an_image_prepares_to_the_processors_output(processor):
    img = _image(3)
    prep = PromptPreparer(processor, vocab_size=10**9)
    (chat,) = prep.chat(_messages(img))
    got = prep.prepare({**chat, "cache_salt": "user-1"})
    text, images = processor.apply_chat_template(_messages(img))
    p = processor.process(text, images)
    _same(got, PreparedPrompt(text, p.input_ids, p.images, cache_salt("user-1"), [image_hash(v) for v in p.images]))
    assert prep.prepare(got) is got  # prepared once, passed through
    assert len(prep.chat([_messages(img), [{"role": "user", "content": "Hi."}]])) == 2
    assert prompt_list(chat) == [chat] and prompt_list([1, 2]) == [[1, 2]] and prompt_list(["a", "b"]) == ["a", "b"]


def test_llm_prepares_through_the_preparer(tiny_ckpt, processor):
    llm = LLM(tiny_ckpt, dtype="float32", device="cpu", kv_cache_memory="2MiB")
    prep = PromptPreparer(processor, llm.model.cfg.text.vocab_size)
    img = _image(4)
    (chat,) = prep.chat(_messages(img))
    _same(llm.prepare(chat), prep.prepare(chat))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.prepare([llm.model.cfg.text.vocab_size])

"""Engine features on a CUDA engine (Triton kernels on) that the CPU suite checks on the CPU path only:
n-gram speculative decoding gives exactly the outputs of plain decoding (its verify chunks go through the paged
prefill kernel), and the vision encoder batched over several images with the fused Triton attention gives each
image what encoding it alone gives, so a step's images can share one encoder call; sleep mode gives the device
memory back (KV pool, and weights offloaded or discarded) and wakes to the same answers."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from step3vl import LLM, SamplingParams
from step3vl.processor import IMAGE_PLACEHOLDER, Step3VLProcessor
from step3vl.tools.make_tiny_checkpoint import make_tiny_checkpoint

# STEP3VL_GPU_TESTS_ON_CPU=1 runs this file's logic on the CPU path (to check the tests themselves where no GPU is).
DEVICE = "cpu" if os.environ.get("STEP3VL_GPU_TESTS_ON_CPU") else "cuda"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                                  reason="needs a CUDA GPU")]

SPEC = {"method": "ngram", "num_speculative_tokens": 4}
PROMPTS = ["Once upon a time once upon a time", "The quick brown fox", "abc abc abc abc abc"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("features-gpu"), preset="tiny", seed=0, shards=1)


def _image(seed: int, size=(96, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.mark.parametrize("params", [
    SamplingParams(n=2, temperature=0.0, max_tokens=64, ignore_eos=True),
    SamplingParams(n=3, temperature=0.05, top_p=0.95, seed=3, max_tokens=64, ignore_eos=True, logprobs=2),
], ids=["greedy", "sampled"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_speculation_keeps_outputs_on_cuda(ckpt, params, dtype):
    outs = {}
    for name, spec in (("plain", None), ("ngram", SPEC)):
        llm = LLM(ckpt, dtype=dtype, device=DEVICE, kv_cache_memory="16MiB", speculative_config=spec)
        outs[name] = llm.generate(PROMPTS, params, use_tqdm=False)
        stats = llm.kv_stats()
    for a, b in zip(outs["plain"], outs["ngram"], strict=True):
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
        for c, d in zip(a.outputs, b.outputs):
            for lc, ld in zip(c.logprobs or [], d.logprobs or [], strict=True):
                assert lc.keys() == ld.keys() and all(abs(lc[t] - ld[t]) < 1e-3 for t in lc)
    assert 0 < stats["spec_accepted_tokens"] < stats["spec_draft_tokens"]  # both outcomes were exercised


def test_batched_image_encoding_equals_one_at_a_time(ckpt):
    if DEVICE == "cuda":
        from step3vl_kernels.vision_attention import vision_attention
    else:
        from step3vl.model.vision import sdpa_vision_attention as vision_attention
    proc = Step3VLProcessor.from_pretrained(ckpt)
    llm = LLM(ckpt, dtype="float32", device=DEVICE, kv_cache_memory="16MiB")
    model = llm.model
    sizes = [(96, 64), (1000, 600), (64, 160)]  # global view only; 504-px crops; a narrow image, its own window
    images = [proc.process(IMAGE_PLACEHOLDER, [_image(i, s)]).images[0] for i, s in enumerate(sizes)]
    assert [im.crops.shape[0] > 0 for im in images] == [False, True, True]
    with torch.inference_mode():
        together = model.encode_images(images, vision_attention)
        alone = [model.encode_images([im], vision_attention)[0] for im in images]
    for t, a in zip(together, alone, strict=True):
        assert t.shape == a.shape
        torch.testing.assert_close(t, a, rtol=1e-4, atol=1e-4)


def test_engine_encodes_a_steps_images_together_on_cuda(ckpt):
    """Three image requests in one step (one encoder call) each get what the request alone gets."""
    text = f"Look: {IMAGE_PLACEHOLDER} What is it?"
    imgs = [_image(10 + i) for i in range(3)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    alone = []
    for im in imgs:
        llm = LLM(ckpt, dtype="float32", device=DEVICE, kv_cache_memory="16MiB")
        alone.append(llm.generate([{"prompt": text, "images": [im]}], params, use_tqdm=False)[0].outputs[0].token_ids)
    llm = LLM(ckpt, dtype="float32", device=DEVICE, kv_cache_memory="16MiB", max_num_batched_tokens=2048)
    together = llm.generate([{"prompt": text, "images": [im]} for im in imgs], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in together] == alone
    assert (llm.kv_stats()["images_encoded"], llm.kv_stats()["encoder_calls"]) == (3, 1)


@pytest.mark.parametrize("level", [1, 2])
def test_sleep_frees_device_memory_and_wakes_to_the_same_answers(ckpt, level):
    llm = LLM(ckpt, dtype="bfloat16", device=DEVICE, kv_cache_memory="64MiB")
    params = SamplingParams(n=2, temperature=0.0, max_tokens=24, ignore_eos=True)
    before = [c.token_ids for c in llm.generate(PROMPTS, params, use_tqdm=False)[0].outputs]
    used = torch.cuda.memory_allocated() if DEVICE == "cuda" else 0
    freed = llm.sleep(level)
    assert freed >= 0.9 * 64 * 2**20  # at least the pool
    if DEVICE == "cuda":  # the pool and (both levels, on a GPU) the weights left the device
        assert used - torch.cuda.memory_allocated() >= freed * 0.95
    llm.wake_up()
    after = [c.token_ids for c in llm.generate(PROMPTS, params, use_tqdm=False)[0].outputs]
    assert after == before

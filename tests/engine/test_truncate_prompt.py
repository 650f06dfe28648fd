"""SamplingParams.truncate_prompt_tokens (vLLM's): the engine keeps the prompt's last k tokens, so a request
with it equals the same request on those tokens alone (greedy, against the dense model); -1 keeps as many as
leave room for one generated token; a cut into an image's tokens is refused."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from step3vl import LLM, SamplingParams
from step3vl.processor import IMAGE_PLACEHOLDER

PROMPT = [11, 42, 7, 99, 5, 23, 61, 8, 17, 4, 90, 33, 12]


@pytest.fixture(scope="module")
def llm(tiny_ckpt) -> LLM:
    return LLM(tiny_ckpt, dtype="float32", device="cpu", kv_cache_memory="4MiB", max_model_len=256)


@pytest.mark.parametrize("k", [1, 5, len(PROMPT), 100])
def test_truncated_prompt_equals_its_tail_alone(llm, tiny_dense, k):
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, truncate_prompt_tokens=k)
    out = llm.generate([PROMPT], params, use_tqdm=False)[0]
    tail = PROMPT[-k:]
    assert out.prompt_token_ids == tail
    assert out.outputs[0].token_ids == tiny_dense.greedy(tail, 6)


def test_minus_one_keeps_what_fits_the_context(llm, tiny_dense):
    long = (PROMPT * 30)[:300]  # over max_model_len 256
    with pytest.raises(ValueError, match="does not fit max_model_len 256"):
        llm.generate([long], SamplingParams(max_tokens=4), use_tqdm=False)
    out = llm.generate([long], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True,
                                              truncate_prompt_tokens=-1), use_tqdm=False)[0]
    assert out.prompt_token_ids == long[-255:]
    assert out.outputs[0].token_ids == tiny_dense.greedy(long[-255:], 1)  # one token left: length limit
    assert out.outputs[0].finish_reason == "length"
    assert not llm.has_unfinished_requests()


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "3"])
def test_bad_values_are_refused_naming_the_field(bad):
    with pytest.raises(ValueError, match="SamplingParams.truncate_prompt_tokens"):
        SamplingParams(truncate_prompt_tokens=bad)


def test_a_cut_into_image_tokens_is_refused_and_one_before_them_runs(llm):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    prompt = {"prompt": f"one two three four five {IMAGE_PLACEHOLDER} what?", "images": [img]}
    ids = llm.prepare(prompt).token_ids
    first = ids.index(llm.model.cfg.image_token_id) - 1  # the image's opening marker
    greedy = dict(temperature=0, max_tokens=3, ignore_eos=True)
    with pytest.raises(ValueError, match="would cut into the image tokens"):
        llm.generate([prompt], SamplingParams(**greedy, truncate_prompt_tokens=len(ids) - first - 1),
                     use_tqdm=False)
    assert not llm.has_unfinished_requests()
    kept = llm.generate([prompt], SamplingParams(**greedy, truncate_prompt_tokens=len(ids) - first),
                        use_tqdm=False)[0]
    assert kept.prompt_token_ids == ids[first:]
    # Same as a prompt that starts at the image: the text before it is gone, the image's features are not.
    alone = llm.generate([{"prompt": f"{IMAGE_PLACEHOLDER} what?", "images": [img]}], SamplingParams(**greedy),
                         use_tqdm=False)[0]
    assert alone.prompt_token_ids == kept.prompt_token_ids
    assert alone.outputs[0].token_ids == kept.outputs[0].token_ids

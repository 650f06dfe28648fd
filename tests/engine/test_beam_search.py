"""LLM.beam_search (vLLM's) against transformers' beam search on the same Qwen3 weights, against a plain beam
search over the dense model's log-softmax (EOS handling, length penalty), and at width 1 against greedy decoding."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from PIL import Image

from step3vl import LLM, SamplingParams
from step3vl.engine import BeamSearchParams
from step3vl.engine.beam_search import beam_score
from step3vl.processor import IMAGE_PLACEHOLDER

PROMPT = [11, 42, 7, 99, 5, 23, 61, 8, 17]


@pytest.fixture(scope="module")
def qwen3_llm(qwen3_ckpt) -> LLM:
    return LLM(qwen3_ckpt[0], dtype="float32", device="cpu", kv_cache_memory="4MiB", block_size=4)


@pytest.mark.parametrize("width", [2, 4])
def test_beams_equal_transformers_num_beams(qwen3_llm, qwen3_ckpt, width):
    hf = qwen3_ckpt[1]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([PROMPT]), num_beams=width, num_return_sequences=width, do_sample=False,
                          max_new_tokens=8, length_penalty=0.0, early_stopping=False, eos_token_id=None,
                          pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    got = qwen3_llm.beam_search([PROMPT], BeamSearchParams(beam_width=width, max_tokens=8, ignore_eos=True))[0]
    assert [s.output_token_ids for s in got.sequences] == ref.sequences[:, len(PROMPT):].tolist()
    assert [s.cum_logprob for s in got.sequences] == pytest.approx(ref.sequences_scores.tolist(), abs=1e-4)
    assert all(s.tokens[:len(PROMPT)] == PROMPT and s.finish_reason == "length" for s in got.sequences)


def _reference(dense, prompt, width, steps, eos, length_penalty):
    """Beam search written out over the dense model: candidates are each beam's 2·width best next tokens."""
    live, done = [(list(prompt), 0.0)], []
    for _ in range(steps):
        cands = []
        for toks, cum in live:
            logp = torch.log_softmax(dense.logits([toks])[0][-1].double(), -1)
            for t in torch.topk(logp, 2 * width).indices.tolist():
                (done if t in eos else cands).append((toks + [t], cum + float(logp[t])))
        live = sorted(cands, key=lambda c: c[1], reverse=True)[:width]

    def score(c):
        n = len(c[0]) - (1 if c[0][-1] in eos and c in done else 0)
        return c[1] / n ** length_penalty

    return sorted(done + live, key=score, reverse=True)[:width]


@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0])
def test_eos_finishes_beams_and_the_length_penalty_ranks_them(qwen3_llm, qwen3_dense, monkeypatch, length_penalty):
    """Declare the dense model's 2nd and 5th most likely first tokens EOS: beams end there and are ranked by
    cum_logprob / len^length_penalty among the live ones, as the reference does."""
    first = torch.topk(qwen3_dense.logits([PROMPT])[0][-1], 5).indices.tolist()
    eos = {first[1], first[4]}
    monkeypatch.setattr(qwen3_llm, "core_config", dataclasses.replace(qwen3_llm.core_config, eos_token_ids=frozenset(eos)))
    got = qwen3_llm.beam_search([PROMPT], BeamSearchParams(beam_width=3, max_tokens=5,
                                                           length_penalty=length_penalty))[0].sequences
    want = _reference(qwen3_dense, PROMPT, 3, 5, eos, length_penalty)
    assert [s.tokens for s in got] == [w[0] for w in want]
    assert [s.cum_logprob for s in got] == pytest.approx([w[1] for w in want], abs=1e-4)
    assert any(s.finish_reason == "stop" for s in got) or length_penalty == 0.0
    scores = [beam_score(s, eos, length_penalty) for s in got]
    assert scores == sorted(scores, reverse=True)


def test_width_one_is_greedy_and_images_ride_along(tiny_ckpt, tiny_dense):
    llm = LLM(tiny_ckpt, dtype="float32", device="cpu", kv_cache_memory="4MiB", max_model_len=512)
    got = llm.beam_search(PROMPT, BeamSearchParams(beam_width=1, max_tokens=6, ignore_eos=True))[0].sequences
    assert got[0].output_token_ids == tiny_dense.greedy(PROMPT, 6)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    prompt = {"prompt": f"{IMAGE_PLACEHOLDER} what?", "images": [img]}
    greedy = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)
    beams = llm.beam_search([prompt], BeamSearchParams(beam_width=1, max_tokens=5, ignore_eos=True))[0].sequences
    assert beams[0].output_token_ids == greedy[0].outputs[0].token_ids
    assert llm.kv_stats()["images_encoded"] == 1  # every step's beams reuse the image's cached features
    assert beams[0].text == llm.get_tokenizer().decode(beams[0].tokens)


def test_bad_beam_search_input_is_refused(qwen3_llm):
    for kw, field in [(dict(beam_width=0, max_tokens=4), "beam_width"), (dict(beam_width=2, max_tokens=0), "max_tokens"),
                      (dict(beam_width=2, max_tokens=4, length_penalty=math.nan), "length_penalty")]:
        with pytest.raises(ValueError, match=f"BeamSearchParams.{field}"):
            BeamSearchParams(**kw)
    with pytest.raises(ValueError, match="over max_logprobs 20"):
        qwen3_llm.beam_search([PROMPT], BeamSearchParams(beam_width=11, max_tokens=2))
    with pytest.raises(ValueError, match="prompt 1: 9 tokens \\+ max_tokens 1016 do not fit"):
        qwen3_llm.beam_search(["hi", PROMPT], BeamSearchParams(beam_width=2, max_tokens=1016))
    assert not qwen3_llm.has_unfinished_requests()


def test_async_beam_search_equals_the_batch_one_while_other_requests_run(qwen3_ckpt, qwen3_llm):
    import asyncio

    from step3vl.engine import AsyncLLM

    params = BeamSearchParams(beam_width=3, max_tokens=6, ignore_eos=True)
    want = qwen3_llm.beam_search([PROMPT], params)[0].sequences
    engine = AsyncLLM(LLM(qwen3_ckpt[0], dtype="float32", device="cpu", kv_cache_memory="4MiB", block_size=4))

    async def main():
        async def other():
            async for out in engine.generate([5, 6, 7], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)):
                pass
            return out

        return await asyncio.gather(engine.beam_search(PROMPT, params), other())

    try:
        got, other = asyncio.run(main())
    finally:
        engine.shutdown()
    assert [s.tokens for s in got.sequences] == [s.tokens for s in want]
    assert [s.cum_logprob for s in got.sequences] == pytest.approx([s.cum_logprob for s in want], abs=1e-5)
    assert len(other.outputs[0].token_ids) == 20

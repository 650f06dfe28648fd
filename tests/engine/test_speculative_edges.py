"""Edge cases of n-gram speculative decoding: with speculative_config, outputs (token ids, text, finish_reason,
stop_reason, logprobs, prompt logprobs) must equal those of the same engine without it, and no KV block may
leak. Situations the feature's own tests (test_speculative.py) do not reach: prompts that draft from the first
decode on (accepted drafts at every step), EOS / stop ids / stop strings inside accepted drafts, max_tokens 1
and 2, top-k / min-p / logprobs / prompt logprobs, aborts, identical-prompt followers, tiny pools with small
blocks, drafts longer than a block, a tiny token budget, max_model_len boundaries, prefix reuse across calls,
staggered arrivals (verify chunks in steps that also prefill), batches that mix requests which can and cannot
speculate, image prompts, bfloat16, and the config's validation."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from step3vl import LLM, SamplingParams
from step3vl.engine.speculative import SpeculativeConfig
from step3vl.processor import IMAGE_PLACEHOLDER

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
PROMPTS = ["Once upon a time once upon a time", "The quick brown fox", "abc abc abc abc abc"]
BLOCK_BYTES = 8192  # the tiny checkpoint's fp32 KV block at block_size 16


def _llm(ckpt, spec=None, **kw) -> LLM:
    return LLM(ckpt, **{"dtype": "float32", "device": "cpu", "kv_cache_memory": "4MiB", **kw},
               speculative_config=spec)


def _pair(ckpt, prompts, params, spec=SPEC, **kw):
    """(plain outputs, speculative outputs, the speculative engine)."""
    plain = _llm(ckpt, **kw).generate(prompts, params, use_tqdm=False)
    llm = _llm(ckpt, spec, **kw)
    return plain, llm.generate(prompts, params, use_tqdm=False), llm


def _same(a, b):
    for x, y in zip(a, b, strict=True):
        for c, d in zip(x.outputs, y.outputs, strict=True):
            assert (c.token_ids, c.text, c.finish_reason, c.stop_reason) == (d.token_ids, d.text, d.finish_reason,
                                                                              d.stop_reason)
            assert (c.logprobs is None) == (d.logprobs is None)
            for lc, ld in zip(c.logprobs or [], d.logprobs or [], strict=True):
                assert lc.keys() == ld.keys()
                assert all(abs(lc[t] - ld[t]) < 1e-4 for t in lc)
        assert (x.prompt_logprobs is None) == (y.prompt_logprobs is None)
        for pc, pd in zip(x.prompt_logprobs or [], y.prompt_logprobs or [], strict=True):
            assert (pc is None) == (pd is None)
            if pc is not None:
                assert pc.keys() == pd.keys() and all(abs(pc[t] - pd[t]) < 1e-4 for t in pc)


def _no_leak(llm: LLM):
    llm.engine.block_manager.check_invariants()
    assert llm.kv_stats()["blocks_used"] == 0
    assert not llm.engine.scheduler.running and not llm.engine.scheduler.waiting


@pytest.fixture(scope="module")
def repeating(tiny_ckpt) -> list[list[int]]:
    """Prompts that end inside their own greedy continuation: drafts are proposed (and mostly accepted) from the
    first decode step on, the situation where speculation does the most."""
    outs = _llm(tiny_ckpt).generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=80, ignore_eos=True),
                                    use_tqdm=False)
    return [o.prompt_token_ids + o.outputs[0].token_ids[:k] for o, k in zip(outs, (60, 14, 74))]


def _ids(prompts):
    return [{"prompt_token_ids": p} for p in prompts]


# -- sampling edges ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("params", [
    SamplingParams(n=2, temperature=0.0, max_tokens=1, ignore_eos=True),
    SamplingParams(n=2, temperature=0.0, max_tokens=2, ignore_eos=True),
    SamplingParams(n=3, temperature=0.0, max_tokens=3, ignore_eos=True, logprobs=1),
    SamplingParams(n=4, temperature=0.1, top_k=5, min_p=0.05, seed=5, max_tokens=40, ignore_eos=True, logprobs=3),
    SamplingParams(n=2, temperature=0.05, seed=2, max_tokens=30, ignore_eos=True, logprobs=0, prompt_logprobs=2),
    SamplingParams(n=2, temperature=0.0, max_tokens=None, ignore_eos=True),  # only max_model_len ends it
], ids=["max1", "max2", "max3-logprobs", "topk-minp-logprobs", "prompt-logprobs", "max-none"])
def test_sampling_edges(tiny_ckpt, repeating, params):
    plain, spec, llm = _pair(tiny_ckpt, _ids(repeating), params, max_model_len=128)
    _same(plain, spec)
    _no_leak(llm)
    if params.max_tokens is None or params.max_tokens > 2:
        assert llm.kv_stats()["spec_accepted_tokens"] > 0
    else:  # the step would yield more than max_tokens: no room for a draft
        assert llm.kv_stats()["spec_draft_tokens"] == 0


def test_stop_token_ids_inside_accepted_drafts(tiny_ckpt, repeating):
    """Every distinct output token of a prompt that drafts at every step, as a stop id."""
    greedy = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    (free,) = _llm(tiny_ckpt).generate(_ids(repeating[1:2]), greedy, use_tqdm=False)
    for t in sorted(set(free.outputs[0].token_ids))[:8]:
        params = SamplingParams(n=2, temperature=0.0, max_tokens=40, ignore_eos=True, stop_token_ids=[t])
        plain, spec, llm = _pair(tiny_ckpt, _ids(repeating), params)
        _same(plain, spec)
        _no_leak(llm)
        assert spec[1].outputs[0].stop_reason == t


def test_eos_inside_accepted_drafts(tiny_ckpt):
    """A prompt that contains its own greedy continuation up to and past an EOS: the EOS arrives as an accepted
    draft (ignore_eos=False)."""
    llm = _llm(tiny_ckpt)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 500, int(rng.integers(3, 20))).tolist() for _ in range(40)]
    outs = llm.generate(_ids(prompts), SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True),
                        use_tqdm=False)
    eos = llm.engine.eos_token_ids
    with_eos = [p + o.outputs[0].token_ids for p, o in zip(prompts, outs)
                if any(t in eos for t in o.outputs[0].token_ids[2:])]
    assert with_eos
    plain, spec, sllm = _pair(tiny_ckpt, _ids(with_eos), SamplingParams(n=2, temperature=0.0, max_tokens=60))
    _same(plain, spec)
    _no_leak(sllm)
    assert any(c.finish_reason == "stop" for o in spec for c in o.outputs)
    assert sllm.kv_stats()["spec_accepted_tokens"] > 0


def test_stop_strings_inside_accepted_drafts(tiny_ckpt, repeating):
    greedy = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    (free,) = _llm(tiny_ckpt).generate(_ids(repeating[2:]), greedy, use_tqdm=False)
    text = free.outputs[0].text
    for i in range(0, len(text) - 2, 7):
        for include in (False, True):
            params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop=[text[i:i + 2]],
                                    include_stop_str_in_output=include)
            plain, spec, llm = _pair(tiny_ckpt, _ids(repeating[2:]), params)
            _same(plain, spec)
            _no_leak(llm)


# -- scheduling: forks, followers, aborts, small pools, budgets ---------------------------------------------------

def test_identical_prompt_followers_and_forks(tiny_ckpt, repeating):
    """Requests with the same prompt (deduplicated: forked from the first) and n > 1, some greedy, some seeded."""
    prompts = _ids([repeating[1], repeating[1], repeating[0], repeating[1]])
    params = [SamplingParams(n=3, temperature=0.0, max_tokens=40, ignore_eos=True),
              SamplingParams(n=2, temperature=0.05, seed=1, max_tokens=40, ignore_eos=True, logprobs=1),
              SamplingParams(n=2, temperature=0.0, max_tokens=40, ignore_eos=True),
              SamplingParams(n=1, temperature=0.0, max_tokens=33, ignore_eos=True)]
    plain, spec, llm = _pair(tiny_ckpt, prompts, params, max_num_batched_tokens=16)
    _same(plain, spec)
    _no_leak(llm)
    assert llm.kv_stats()["deduplicated_prompts"] > 0 and llm.kv_stats()["spec_accepted_tokens"] > 0


@pytest.mark.parametrize("kw", [{}, {"kv_cache_memory": 12 * BLOCK_BYTES}], ids=["large-pool", "preempting"])
def test_abort_mid_generation_frees_blocks(tiny_ckpt, repeating, kw):
    """Abort each request at several steps while drafts are being verified: the others are unchanged and every
    block comes back."""
    prompts = _ids(repeating) + _ids(repeating[1:2])  # the last one follows the second (same prompt)
    params = SamplingParams(n=2, temperature=0.0, max_tokens=30, ignore_eos=True)
    ref = _llm(tiny_ckpt, **kw).generate(prompts, params, use_tqdm=False)
    for victim, at in ((0, 1), (1, 3), (2, 6), (3, 2), (1, 0)):
        llm = _llm(tiny_ckpt, SPEC, **kw)
        ids = [llm.add_request(p, params, request_id=str(i)) for i, p in enumerate(prompts)]
        done, steps = {}, 0
        while llm.has_unfinished_requests():
            if steps == at:
                assert llm.abort(ids[victim]).finished
            for out in llm.step():
                if out.finished:
                    done[out.request_id] = out
            steps += 1
        _same([ref[i] for i in range(len(prompts)) if i != victim],
              [done[str(i)] for i in range(len(prompts)) if i != victim])
        _no_leak(llm)


@pytest.mark.parametrize("block_size,blocks,spec", [
    (4, 13, SPEC),
    (2, 30, {**SPEC, "num_speculative_tokens": 9, "prompt_lookup_min": 1, "prompt_lookup_max": 1}),
    (1, 400, {**SPEC, "num_speculative_tokens": 7}),  # every draft token takes its own block
    (16, 4, SPEC),  # so small that sequences end "length" when they alone fill the pool
], ids=["bs4", "bs2-k9", "bs1", "stuck"])
def test_tiny_pools_and_drafts_spanning_blocks(tiny_ckpt, repeating, block_size, blocks, spec):
    kv = blocks * BLOCK_BYTES * block_size // 16
    prompts = _ids([p for p in repeating if len(p) < blocks * block_size]) + PROMPTS
    params = SamplingParams(n=3, temperature=0.0, max_tokens=60, ignore_eos=True)
    plain, out, llm = _pair(tiny_ckpt, prompts, params, spec, block_size=block_size, kv_cache_memory=kv)
    _same(plain, out)
    _no_leak(llm)
    assert llm.kv_stats()["preemptions"] > 0 and llm.kv_stats()["spec_accepted_tokens"] > 0


@pytest.mark.parametrize("kw", [{"max_num_batched_tokens": 3}, {"max_num_batched_tokens": 7, "max_num_seqs": 2}],
                         ids=["budget3", "budget7-seqs2"])
def test_small_token_budget(tiny_ckpt, repeating, kw):
    params = SamplingParams(n=2, temperature=0.1, top_k=3, seed=9, max_tokens=40, ignore_eos=True, logprobs=1)
    plain, spec, llm = _pair(tiny_ckpt, _ids(repeating), params, **kw)
    _same(plain, spec)
    _no_leak(llm)


def test_max_model_len_boundaries(tiny_ckpt, repeating):
    """Prompts 1..8 tokens short of max_model_len, and max_tokens beyond it: drafts are capped by the room left."""
    p = repeating[1]
    for room in range(1, 9):
        for params in (SamplingParams(n=2, temperature=0.0, max_tokens=None, ignore_eos=True),
                       SamplingParams(n=2, temperature=0.0, max_tokens=3, ignore_eos=True)):
            plain, spec, llm = _pair(tiny_ckpt, _ids([p]), params, max_model_len=len(p) + room, block_size=4)
            _same(plain, spec)
            _no_leak(llm)
            want = room if params.max_tokens is None else min(room, 3)
            assert [len(c.token_ids) for c in spec[0].outputs] == [want, want]


def test_prefix_cache_reuse_across_calls(tiny_ckpt, repeating):
    """A second generate call on the speculating engine (prompts that extend the first call's outputs, served from
    its cached blocks, including blocks whose tokens were accepted drafts) equals a fresh plain engine's output."""
    params = SamplingParams(n=3, temperature=0.0, max_tokens=50, ignore_eos=True)
    for kw in ({}, {"kv_cache_memory": 20 * BLOCK_BYTES}, {"block_size": 4}):
        llm = _llm(tiny_ckpt, SPEC, **kw)
        first = llm.generate(_ids(repeating), params, use_tqdm=False)
        again = [o.prompt_token_ids + o.outputs[i].token_ids[:k]
                 for o in first for i, k in ((0, 17), (1, 40))]
        hits = llm.kv_stats()["prefix_hit_tokens"]
        second = llm.generate(_ids(again), params, use_tqdm=False)
        assert llm.kv_stats()["prefix_hit_tokens"] > hits
        _same(_llm(tiny_ckpt, **kw).generate(_ids(again), params, use_tqdm=False), second)
        _no_leak(llm)


@pytest.mark.parametrize("kw", [{}, {"cpu_kernels": False}, {"kv_cache_memory": 14 * BLOCK_BYTES}],
                         ids=["native", "torch", "preempting"])
def test_staggered_arrivals(tiny_ckpt, repeating, kw):
    """Requests arriving while others verify drafts: steps that hold verify chunks and prefill chunks together
    (off the one-call CPU decode stack)."""
    prompts = _ids(repeating) + PROMPTS
    params = SamplingParams(n=2, temperature=0.0, max_tokens=40, ignore_eos=True)

    def drive(spec):
        llm = _llm(tiny_ckpt, spec, **kw)
        pending, done, steps = list(enumerate(prompts)), {}, 0
        while pending or llm.has_unfinished_requests():
            if pending and steps % 3 == 0:
                i, p = pending.pop(0)
                llm.add_request(p, params, request_id=str(i))
            for out in llm.step():
                if out.finished:
                    done[out.request_id] = out
            steps += 1
        return [done[str(i)] for i in range(len(prompts))], llm

    plain, _ = drive(None)
    spec, llm = drive(SPEC)
    _same(plain, spec)
    _no_leak(llm)
    assert llm.kv_stats()["spec_accepted_tokens"] > 0


@pytest.mark.parametrize("cpu_kernels", [True, False])
def test_batch_mixing_rules_that_cannot_speculate(tiny_ckpt, repeating, cpu_kernels):
    """Penalties, logit bias, min_tokens, allowed ids, a logits processor and structured outputs, in one batch with
    greedy and seeded requests that speculate."""
    g = dict(temperature=0.0, max_tokens=30, ignore_eos=True)
    kinds = [SamplingParams(n=2, **g), SamplingParams(repetition_penalty=1.3, **g),
             SamplingParams(n=2, logit_bias={152: 5.0}, **g), SamplingParams(min_tokens=5, temperature=0.0, max_tokens=30),
             SamplingParams(allowed_token_ids=[152, 434, 221, 3, 105, 227], **g),
             SamplingParams(n=2, temperature=0.05, seed=1, max_tokens=30, ignore_eos=True, logprobs=1),
             SamplingParams(structured_outputs={"choice": ["yes", "no", "maybe"]}, temperature=0.0, max_tokens=30),
             SamplingParams(logits_processors=[lambda ids, row: row], **g),
             SamplingParams(frequency_penalty=0.5, presence_penalty=0.2, n=2, **g)]
    prompts = [p for p in _ids(repeating) for _ in kinds]
    params = [k for _ in repeating for k in kinds]
    plain, spec, llm = _pair(tiny_ckpt, prompts, params, cpu_kernels=cpu_kernels)
    _same(plain, spec)
    _no_leak(llm)
    assert llm.kv_stats()["spec_accepted_tokens"] > 0


def test_image_prompts(tiny_ckpt):
    """Image prompts (their <im_patch> rows are in the n-gram history), a second call reusing their blocks."""
    def image(seed):
        rng = np.random.default_rng(seed)
        return Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))

    text = f"Look: {IMAGE_PLACEHOLDER} What is it? abc abc abc abc"
    prompts = [{"prompt": text, "images": [image(1)]}, {"prompt": text, "images": [image(2)]},
               {"prompt": text + " again abc abc", "images": [image(1)]}]
    params = SamplingParams(n=2, temperature=0.0, max_tokens=40, ignore_eos=True)
    plain, spec, llm = _pair(tiny_ckpt, prompts, params, kv_cache_memory="2MiB")
    _same(plain, spec)
    assert llm.kv_stats()["spec_accepted_tokens"] > 0
    _same(plain[::-1], llm.generate(prompts[::-1], params, use_tqdm=False))
    _no_leak(llm)


# -- dtype and config ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cpu_kernels", [True, False])
def test_bfloat16_outputs_identical(tiny_ckpt, repeating, cpu_kernels):
    """dtype bfloat16 (the default on CUDA), where two attention paths would differ in the last bits: a verify
    chunk's rows go through the decode attention, as the tokens do without speculation. (They once ran as a
    prefill chunk, bf16 SDPA, and these outputs changed at token 26.)"""
    params = SamplingParams(n=3, temperature=0.0, max_tokens=50, ignore_eos=True)
    prompts = _ids(repeating)
    plain = _llm(tiny_ckpt, dtype="bfloat16", cpu_kernels=cpu_kernels).generate(prompts, params, use_tqdm=False)
    alone = [_llm(tiny_ckpt, dtype="bfloat16", cpu_kernels=cpu_kernels).generate([p], params, use_tqdm=False)[0]
             for p in prompts]
    _same(plain, alone)  # plain bf16 decoding is batch-invariant here
    spec = _llm(tiny_ckpt, SPEC, dtype="bfloat16", cpu_kernels=cpu_kernels).generate(prompts, params, use_tqdm=False)
    _same(plain, spec)


@pytest.mark.parametrize("field,value", [("num_speculative_tokens", 2.5), ("num_speculative_tokens", "3"),
                                         ("prompt_lookup_max", 3.5), ("disable_by_batch_size", 2.0),
                                         ("prompt_lookup_min", True)])
def test_config_rejects_non_integers(field, value):
    """Refused when the engine is built, naming the field (a float k once failed inside a step)."""
    with pytest.raises(ValueError, match=field):
        SpeculativeConfig.of({"method": "ngram", field: value})

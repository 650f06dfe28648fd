"""N-gram speculative decoding: the proposer against a brute-force search, and the engine with speculation
against the same engine without it. Every position draws the token it would draw anyway, so outputs must be
identical token for token (and log-prob for log-prob) for greedy and seeded sampling, through stop strings,
length limits, forks, preemption and the prefix cache; only the number of steps changes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from step3vl import LLM, SamplingParams
from step3vl.engine.speculative import SpeculativeConfig, ngram_draft

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
PROMPTS = ["Once upon a time once upon a time", "The quick brown fox", "abc abc abc abc abc"]


def _brute_draft(tokens: list[int], k: int, n_min: int, n_max: int) -> list[int]:
    for n in range(min(n_max, len(tokens) - 1), n_min - 1, -1):
        suffix = tokens[len(tokens) - n:]
        for start in range(len(tokens) - n - 1, -1, -1):  # latest earlier occurrence first
            if tokens[start:start + n] == suffix:
                return tokens[start + n:start + n + k]
    return []


def test_ngram_draft_hand_cases():
    assert ngram_draft(np.array([1, 2, 3, 9, 1, 2, 3]), 3, 2, 4) == [9, 1, 2]
    assert ngram_draft(np.array([5, 6, 1, 5, 6, 2, 5, 6]), 2, 2, 4) == [2, 5]  # the latest occurrence
    assert ngram_draft(np.array([7, 5, 6, 1, 8, 5, 6, 2, 7, 5, 6]), 3, 2, 4) == [1, 8, 5]  # the longest n-gram
    assert ngram_draft(np.array([1, 2, 9, 2]), 3, 2, 4) == []  # only a 1-gram repeats
    assert ngram_draft(np.array([4, 4, 4]), 5, 2, 4) == [4]  # what follows may run into the suffix itself
    assert ngram_draft(np.array([1, 2]), 3, 2, 4) == []


@settings(max_examples=400, deadline=None)
@given(st.lists(st.integers(0, 3), max_size=40), st.integers(1, 5), st.integers(1, 3), st.integers(0, 3))
def test_ngram_draft_equals_brute_force(tokens, k, n_min, extra):
    n_max = n_min + extra
    assert ngram_draft(np.array(tokens, dtype=np.int64), k, n_min, n_max) == _brute_draft(tokens, k, n_min, n_max)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="method"):
        SpeculativeConfig.of({"method": "eagle"})
    with pytest.raises(ValueError, match="unknown key"):
        SpeculativeConfig.of({"num_spec_tokens": 3})
    with pytest.raises(ValueError, match="prompt_lookup_min"):
        SpeculativeConfig.of({"prompt_lookup_min": 5, "prompt_lookup_max": 2})
    with pytest.raises(ValueError, match="disable_by_batch_size"):
        SpeculativeConfig.of({"disable_by_batch_size": 1})


def test_disable_by_batch_size_drafts_only_in_smaller_batches(tiny_ckpt):
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    spec = {**SPEC, "disable_by_batch_size": 2}
    base, _ = _run(tiny_ckpt, PROMPTS, params, None)
    alone = [_run(tiny_ckpt, [p], params, spec) for p in PROMPTS]
    together, stats = _run(tiny_ckpt, PROMPTS, params, spec)
    assert sum(s["spec_draft_tokens"] for _, s in alone) > 0  # one sample decoding: below the limit
    assert stats["spec_draft_tokens"] == 0  # three decoding together from the first step to the last
    _same(base, [o for outs, _ in alone for o in outs])
    _same(base, together)


def _run(ckpt, prompts, params, spec, **kw):
    llm = LLM(ckpt, dtype="float32", device="cpu", **{"kv_cache_memory": "4MiB", **kw}, speculative_config=spec)
    outs = llm.generate(prompts, params, use_tqdm=False)
    return outs, llm.kv_stats()


def _same(a, b):
    for x, y in zip(a, b, strict=True):
        for c, d in zip(x.outputs, y.outputs, strict=True):
            assert (c.token_ids, c.text, c.finish_reason, c.stop_reason) == (d.token_ids, d.text, d.finish_reason,
                                                                              d.stop_reason)
            if c.logprobs:
                for lc, ld in zip(c.logprobs, d.logprobs, strict=True):
                    assert lc.keys() == ld.keys()
                    assert all(abs(lc[t] - ld[t]) < 1e-4 for t in lc)


@pytest.mark.parametrize("cpu_kernels", [True, False])
@pytest.mark.parametrize("params", [
    SamplingParams(n=2, temperature=0.0, max_tokens=48, ignore_eos=True),
    SamplingParams(n=3, temperature=0.05, top_p=0.95, seed=3, max_tokens=60, ignore_eos=True, logprobs=2),
], ids=["greedy", "sampled"])
def test_outputs_identical_with_and_without_speculation(tiny_ckpt, params, cpu_kernels):
    base, _ = _run(tiny_ckpt, PROMPTS, params, None, cpu_kernels=cpu_kernels)
    spec, stats = _run(tiny_ckpt, PROMPTS, params, SPEC, cpu_kernels=cpu_kernels)
    _same(base, spec)
    assert 0 < stats["spec_accepted_tokens"] < stats["spec_draft_tokens"]  # both outcomes were exercised


def test_stop_strings_and_length_limits_land_where_they_would(tiny_ckpt):
    greedy = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    (free,), _ = _run(tiny_ckpt, PROMPTS[:1], greedy, None)
    text = free.outputs[0].text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    for params in (SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True, stop=[stop]),
                   SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True, stop=[stop],
                                  include_stop_str_in_output=True),
                   SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True),
                   SamplingParams(temperature=0.0, max_tokens=23, ignore_eos=True)):
        base, _ = _run(tiny_ckpt, PROMPTS, params, None)
        spec, stats = _run(tiny_ckpt, PROMPTS, params, SPEC)
        _same(base, spec)
        assert stats["spec_draft_tokens"] > 0


def test_context_limit_and_preemption(tiny_ckpt):
    params = SamplingParams(n=3, temperature=0.0, max_tokens=60, ignore_eos=True)
    base, _ = _run(tiny_ckpt, PROMPTS, params, None, kv_cache_memory="4MiB")
    spec, stats = _run(tiny_ckpt, PROMPTS, params, SPEC, kv_cache_memory=16 * 8192)  # 16 blocks: preempts
    assert stats["preemptions"] > 0 and stats["spec_accepted_tokens"] > 0
    _same(base, spec)
    near = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)  # runs into max_model_len
    base, _ = _run(tiny_ckpt, PROMPTS[2:], near, None, max_model_len=64)
    spec, _ = _run(tiny_ckpt, PROMPTS[2:], near, SPEC, max_model_len=64)
    _same(base, spec)
    assert spec[0].outputs[0].finish_reason == "length"


def test_rules_that_read_earlier_tokens_decode_one_at_a_time(tiny_ckpt):
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, repetition_penalty=1.2)
    base, _ = _run(tiny_ckpt, PROMPTS, params, None)
    spec, stats = _run(tiny_ckpt, PROMPTS, params, SPEC)
    _same(base, spec)
    assert stats["spec_draft_tokens"] == 0


def test_registered_blocks_hold_only_accepted_tokens(tiny_ckpt):
    """After speculative decoding, a prompt that extends the first answer finds its blocks in the prefix cache and
    continues exactly as the first request did: the cache never holds a rejected draft's KV."""
    llm = LLM(tiny_ckpt, dtype="float32", device="cpu", kv_cache_memory="4MiB", speculative_config=SPEC)
    greedy = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    (first,) = llm.generate([{"prompt_token_ids": llm.prepare(PROMPTS[2]).token_ids}], greedy, use_tqdm=False)
    ids = first.prompt_token_ids + first.outputs[0].token_ids[:40]
    hits = llm.kv_stats()["prefix_hit_tokens"]
    (again,) = llm.generate([{"prompt_token_ids": ids}], SamplingParams(temperature=0.0, max_tokens=24,
                                                                       ignore_eos=True), use_tqdm=False)
    assert llm.kv_stats()["prefix_hit_tokens"] - hits >= 32
    assert again.outputs[0].token_ids == first.outputs[0].token_ids[40:]


def test_verify_chunks_run_the_cpu_decode_stack(tiny_ckpt, monkeypatch):
    """On the native CPU path a step of verify chunks is one decode-stack call with a row per chunk token."""
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    llm = LLM(tiny_ckpt, dtype="float32", device="cpu", kv_cache_memory="4MiB", speculative_config=SPEC)
    stack = llm.engine.runner.decode_stack
    if stack is None:
        pytest.skip("the one-call decode stack runs only where the native cascade kernel does (AVX-512, fp32)")
    rows, run = [], stack.run
    monkeypatch.setattr(stack, "run", lambda x, *a: rows.append(x.shape[0]) or run(x, *a))
    base, _ = _run(tiny_ckpt, PROMPTS[:1], params, None)
    _same(base, llm.generate(PROMPTS[:1], params, use_tqdm=False))
    assert max(rows) > 1 and llm.kv_stats()["spec_accepted_tokens"] > 0  # one sample, several rows: its drafts

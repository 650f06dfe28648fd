"""Prompt log-probs against transformers' log-softmax over the same prompt (fp32), whole and chunked prefill,
with n > 1, an identical prompt already cached, and preemption."""

from __future__ import annotations

import pytest
import torch

from step3vl import LLM, SamplingParams


@pytest.fixture(scope="module")
def prompts(qwen3_ckpt):
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 512, (n,), generator=g).tolist() for n in (2, 37, 300)]


def _hf_logprobs(hf, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = hf(torch.tensor([prompt])).logits[0].float()
    return torch.log_softmax(logits, -1)  # row p predicts token p + 1


def _check(out, hf, k: int) -> None:
    ref = _hf_logprobs(hf, out.prompt_token_ids)
    plp = out.prompt_logprobs
    assert len(plp) == len(out.prompt_token_ids) and plp[0] is None
    for p in range(1, len(plp)):
        tok, row = out.prompt_token_ids[p], ref[p - 1]
        assert plp[p][tok] == pytest.approx(float(row[tok]), abs=2e-4)
        top = row.topk(k)
        for t, v in zip(top.indices.tolist(), top.values.tolist()):
            assert plp[p][t] == pytest.approx(v, abs=2e-4)
        assert len(plp[p]) <= k + 1


@pytest.mark.parametrize("max_batched", [None, 64], ids=["whole", "chunked64"])
def test_prompt_logprobs_equal_transformers(qwen3_ckpt, prompts, max_batched):
    path, hf = qwen3_ckpt
    llm = LLM(path, dtype="float32", device="cpu", kv_cache_memory="4MiB", max_num_batched_tokens=max_batched)
    outs = llm.generate(prompts, SamplingParams(max_tokens=2, prompt_logprobs=3, n=2, seed=0), use_tqdm=False)
    for out in outs:
        _check(out, hf, 3)


def test_a_cached_prompt_is_computed_again_for_its_logprobs(qwen3_ckpt, prompts):
    path, hf = qwen3_ckpt
    llm = LLM(path, dtype="float32", device="cpu", kv_cache_memory="4MiB")
    llm.generate(prompts[2], SamplingParams(max_tokens=1), use_tqdm=False)  # now in the prefix cache
    llm.reset_stats()
    out = llm.generate(prompts[2], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    assert llm.kv_stats()["prefix_hit_tokens"] == 0
    _check(out, hf, 0)
    plain = llm.generate(prompts[2], SamplingParams(max_tokens=1), use_tqdm=False)[0]
    assert plain.prompt_logprobs is None and plain.num_cached_tokens > 0  # others still share the cache


def test_prompt_logprobs_survive_preemption(qwen3_ckpt, prompts):
    path, hf = qwen3_ckpt
    llm = LLM(path, dtype="float32", device="cpu", kv_cache_memory=96 * 1024, block_size=16)
    outs = llm.generate([prompts[1], prompts[0]], SamplingParams(max_tokens=60, ignore_eos=True, prompt_logprobs=1, n=3,
                                                                 seed=2),
                        use_tqdm=False)
    assert llm.kv_stats()["preemptions"] > 0
    for out in outs:
        _check(out, hf, 1)

"""Greedy generation equals transformers' `generate(do_sample=False)` token for token, on a random tiny Qwen3
saved with `save_pretrained`, for a batch of prompts of different lengths — with whole and chunked prefill,
block sizes 16 and 32, and greedy n > 1."""

from __future__ import annotations

import pytest
import torch

from step3vl import LLM, SamplingParams

PROMPT_LENS = [3, 17, 40, 64]
MAX_TOKENS = 24


def _prompts(vocab: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def hf_greedy(qwen3_ckpt) -> tuple[list[list[int]], list[list[int]]]:
    """(prompts, transformers' greedy continuations), one prompt at a time (no padding involved)."""
    _, hf = qwen3_ckpt
    prompts = _prompts(hf.config.vocab_size)
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            gen = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=MAX_TOKENS,
                              min_new_tokens=0, eos_token_id=None, pad_token_id=0)
            outs.append(gen[0, len(p):].tolist())
    assert all(len(o) == MAX_TOKENS for o in outs)
    assert len({tuple(o) for o in outs}) == len(outs), "degenerate reference: prompts gave identical outputs"
    return prompts, outs


@pytest.mark.parametrize("block_size,max_batched", [(16, None), (16, 16), (32, 16)],
                         ids=["bs16", "bs16-chunked16", "bs32-chunked16"])
def test_greedy_batch_equals_transformers(qwen3_ckpt, hf_greedy, block_size, max_batched):
    path, _ = qwen3_ckpt
    prompts, expected = hf_greedy
    llm = LLM(path, dtype="float32", device="cpu", block_size=block_size, kv_cache_memory="4MiB",
              max_num_batched_tokens=max_batched)
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=MAX_TOKENS)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for p, o, want in zip(prompts, outs, expected):
        assert o.prompt_token_ids == p
        (c,) = o.outputs
        assert c.token_ids == want, f"prompt of {len(p)} tokens"
        assert c.finish_reason == "length"
    stats = llm.kv_stats()
    assert stats["prefill_tokens_computed"] == sum(PROMPT_LENS)
    assert stats["blocks_used"] == 0  # everything released


def test_greedy_n_samples_all_equal_transformers(qwen3_ckpt, hf_greedy):
    """n greedy samples of one prompt: forked from one prefill, each equals the greedy continuation."""
    path, _ = qwen3_ckpt
    prompts, expected = hf_greedy
    llm = LLM(path, dtype="float32", device="cpu", kv_cache_memory="4MiB")
    (o,) = llm.generate(prompts[2], SamplingParams(n=3, temperature=0.0, ignore_eos=True, max_tokens=MAX_TOKENS),
                        use_tqdm=False)
    assert [c.index for c in o.outputs] == [0, 1, 2]
    for c in o.outputs:
        assert c.token_ids == expected[2]
    assert llm.kv_stats()["prefill_tokens_computed"] == PROMPT_LENS[2]


def test_greedy_unchanged_beside_sampled_requests(qwen3_ckpt, hf_greedy):
    """Greedy and sampled rows in one batch: the greedy requests still follow transformers exactly."""
    path, _ = qwen3_ckpt
    prompts, expected = hf_greedy
    llm = LLM(path, dtype="float32", device="cpu", kv_cache_memory="4MiB")
    greedy = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=MAX_TOKENS)
    sampled = SamplingParams(n=2, temperature=1.0, top_p=0.8, seed=1, ignore_eos=True, max_tokens=MAX_TOKENS)
    outs = llm.generate([prompts[0], prompts[1], prompts[3], prompts[2]], [greedy, sampled, greedy, sampled],
                        use_tqdm=False)
    assert outs[0].outputs[0].token_ids == expected[0]
    assert outs[2].outputs[0].token_ids == expected[3]

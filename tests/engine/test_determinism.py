"""Seeded sampling is a function of (seed, prompt, sample index) only: the same tokens whether the request
runs alone or in a batch, in a large pool or in one so small that sequences are preempted (and recomputed
from the prefix cache) and cached blocks evicted, and for block sizes 16 and 32."""

from __future__ import annotations

import json

import pytest
import torch

from step3vl import LLM, SamplingParams

PROMPT_LENS = [20, 33, 47, 12]
MAX_TOKENS = 40


def _block_bytes(ckpt, block_size: int) -> int:
    t = json.loads((ckpt / "config.json").read_text())["text_config"]
    return 2 * t["num_hidden_layers"] * block_size * t["num_key_value_heads"] * t["head_dim"] * 4  # fp32


def _llm(ckpt, block_size: int = 16, num_blocks: int = 256, **kw) -> LLM:
    llm = LLM(ckpt, dtype="float32", device="cpu", block_size=block_size,
              kv_cache_memory=num_blocks * _block_bytes(ckpt, block_size), **kw)
    assert llm.kv_stats()["blocks_total"] == num_blocks
    return llm


def _requests() -> list[tuple[list[int], SamplingParams]]:
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 500, (n,), generator=g).tolist() for n in PROMPT_LENS]
    params = [
        SamplingParams(n=2, temperature=1.0, top_p=0.9, seed=11, max_tokens=MAX_TOKENS, ignore_eos=True),
        SamplingParams(n=3, temperature=0.8, top_k=50, seed=12, max_tokens=MAX_TOKENS, ignore_eos=True),
        SamplingParams(n=1, temperature=1.2, min_p=0.001, top_p=0.95, seed=13, max_tokens=MAX_TOKENS,
                       ignore_eos=True),
        SamplingParams(n=2, temperature=1.0, seed=14, max_tokens=MAX_TOKENS, ignore_eos=True),
    ]
    return list(zip(prompts, params))


def _tokens(outs) -> list[list[list[int]]]:
    return [[c.token_ids for c in o.outputs] for o in outs]


@pytest.fixture(scope="module")
def alone(tiny_ckpt) -> list[list[list[int]]]:
    """Every request run on its own in a large pool: the reference."""
    llm = _llm(tiny_ckpt)
    out = []
    for prompt, params in _requests():
        (o,) = llm.generate([prompt], params, use_tqdm=False)
        out.append([c.token_ids for c in o.outputs])
    assert llm.kv_stats()["preemptions"] == 0
    for samples in out:
        assert all(len(t) == MAX_TOKENS for t in samples)
        assert len({tuple(t) for t in samples}) == len(samples), "samples of one request should differ"
    return out


def test_batch_equals_alone(tiny_ckpt, alone):
    llm = _llm(tiny_ckpt)
    reqs = _requests()
    outs = llm.generate([p for p, _ in reqs], [sp for _, sp in reqs], use_tqdm=False)
    assert _tokens(outs) == alone
    assert llm.kv_stats()["preemptions"] == 0


@pytest.mark.parametrize("block_size,num_blocks", [(16, 9), (32, 5)])
def test_small_pool_preempts_and_matches(tiny_ckpt, alone, block_size, num_blocks):
    """A pool of ~150 tokens for 8 samples of up to 87 tokens: preemption is certain; outputs must not move."""
    llm = _llm(tiny_ckpt, block_size=block_size, num_blocks=num_blocks)
    reqs = _requests()
    outs = llm.generate([p for p, _ in reqs], [sp for _, sp in reqs], use_tqdm=False)
    stats = llm.kv_stats()
    assert stats["preemptions"] > 0
    assert stats["prefix_hit_tokens"] > 0  # recomputation reuses what the prefix cache still holds
    assert stats["peak_blocks_used"] <= num_blocks
    assert stats["blocks_used"] == 0
    assert _tokens(outs) == alone
    for o in outs:
        assert all(c.finish_reason == "length" for c in o.outputs)


@pytest.mark.parametrize("block_size", [16, 32])
def test_chunked_prefill_and_tiny_batches_match(tiny_ckpt, alone, block_size):
    """A 16-token step budget (prompts split into chunks, few sequences a step) changes nothing."""
    llm = _llm(tiny_ckpt, block_size=block_size, num_blocks=64, max_num_batched_tokens=16, max_num_seqs=3)
    reqs = _requests()
    outs = llm.generate([p for p, _ in reqs], [sp for _, sp in reqs], use_tqdm=False)
    assert _tokens(outs) == alone


def test_sample_i_stream_depends_on_seed_and_index_only(tiny_ckpt, alone):
    """Sample 0 of an n=3 request = the n=1 request with the same seed; another seed gives other tokens."""
    prompt, params = _requests()[1]  # n=3, seed 12
    llm = _llm(tiny_ckpt)
    one = SamplingParams(n=1, temperature=0.8, top_k=50, seed=12, max_tokens=MAX_TOKENS, ignore_eos=True)
    other = SamplingParams(n=1, temperature=0.8, top_k=50, seed=99, max_tokens=MAX_TOKENS, ignore_eos=True)
    a, b = llm.generate([prompt, prompt], [one, other], use_tqdm=False)
    assert a.outputs[0].token_ids == alone[1][0]
    assert b.outputs[0].token_ids != alone[1][0]


def test_eviction_under_pressure_keeps_results(tiny_ckpt):
    """A finished request's blocks stay cached until a later request needs the room: then the LRU cached
    blocks are evicted (the first prompt no longer hits the cache fully) and everything stays correct."""
    g = torch.Generator().manual_seed(3)
    a_prompt = torch.randint(0, 500, (48,), generator=g).tolist()
    b_prompt = torch.randint(0, 500, (80,), generator=g).tolist()
    sp = SamplingParams(temperature=1.0, seed=5, max_tokens=20, ignore_eos=True)

    big = _llm(tiny_ckpt, num_blocks=64)
    ref_a = big.generate(a_prompt, sp, use_tqdm=False)[0].outputs[0].token_ids
    ref_b = big.generate(b_prompt, sp, use_tqdm=False)[0].outputs[0].token_ids
    hits = big.kv_stats()["prefix_hit_tokens"]
    assert big.generate(a_prompt, sp, use_tqdm=False)[0].outputs[0].token_ids == ref_a
    full_hit = big.kv_stats()["prefix_hit_tokens"] - hits
    assert full_hit >= 32  # A's prompt blocks were all still cached in the large pool

    small = _llm(tiny_ckpt, num_blocks=8)  # A: 68 tokens (5 blocks), B: 100 tokens (7 blocks)
    assert small.generate(a_prompt, sp, use_tqdm=False)[0].outputs[0].token_ids == ref_a
    s = small.kv_stats()
    assert s["blocks_used"] == 0 and s["blocks_cached"] == 68 // 16  # A's full blocks stay cached
    assert small.generate(b_prompt, sp, use_tqdm=False)[0].outputs[0].token_ids == ref_b
    hits = small.kv_stats()["prefix_hit_tokens"]
    assert small.generate(a_prompt, sp, use_tqdm=False)[0].outputs[0].token_ids == ref_a
    assert small.kv_stats()["prefix_hit_tokens"] - hits < full_hit  # B evicted some of A's blocks
    assert small.kv_stats()["preemptions"] == 0


def test_abort_under_pressure(tiny_ckpt, alone):
    """Abort a request while the pool is thrashing (some of its samples may be preempted and waiting):
    its blocks come back, and the other requests' outputs do not move."""
    llm = _llm(tiny_ckpt, num_blocks=9)
    reqs = _requests()
    ids = [llm.add_request(p, sp) for p, sp in reqs]
    while llm.kv_stats()["preemptions"] == 0:
        llm.step()
    out = llm.abort(ids[1])
    assert out.finished and {c.finish_reason for c in out.outputs} == {"abort"}
    done = {}
    while llm.has_unfinished_requests():
        done.update({o.request_id: [c.token_ids for c in o.outputs] for o in llm.step() if o.finished})
    assert ids[1] not in done
    assert [done[ids[i]] for i in (0, 2, 3)] == [alone[i] for i in (0, 2, 3)]
    assert llm.kv_stats()["blocks_used"] == 0

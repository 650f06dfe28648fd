"""The engine's logits (paged CPU attention: cascade decode over shared prefixes + per-sequence suffixes,
chunked prefill over cached context, copy-on-write blocks) equal the model run densely with DenseAttention on
the same tokens, in fp32, at every row the engine samples from."""

from __future__ import annotations

import pytest
import torch

from step3vl import LLM, SamplingParams
from step3vl.engine.model_runner import sample_rows_for


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _capture(llm: LLM) -> list[tuple[list[int], torch.Tensor]]:
    """Record (context token ids, logits row) for every row the runner returns."""
    records = []
    runner = llm.engine.runner
    run = runner.run

    def wrapped(step, rows):
        _, seqs = sample_rows_for(step)
        contexts = [list(s.token_ids) for s in seqs]
        logits = run(step, rows)
        assert logits.shape[0] == len(contexts)
        records.extend(zip(contexts, logits.clone()))
        return logits

    runner.run = wrapped
    return records


def _check(records, dense, atol=1e-4):
    assert records
    ref = dense.last_logits([c for c, _ in records])
    got = torch.stack([r for _, r in records])
    torch.testing.assert_close(got, ref, atol=atol, rtol=1e-4)


@pytest.mark.parametrize("block_size,max_batched", [(16, None), (16, 24), (32, 40)],
                         ids=["bs16", "bs16-chunk24", "bs32-chunk40"])
def test_engine_logits_equal_dense(tiny_ckpt, tiny_dense, block_size, max_batched):
    """A request with 4 samples over a 40-token prompt (cascade group with a shared prefix and a copied
    partial block), a second prompt that shares the first one's first block through the prefix cache (a
    non-contiguous block table, a prefill over cached context), and a short prompt without any full block."""
    llm = LLM(tiny_ckpt, dtype="float32", device="cpu", block_size=block_size, kv_cache_memory="2MiB",
              max_num_batched_tokens=max_batched)
    records = _capture(llm)
    base = _prompt(40, 1)
    sp = SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=10, ignore_eos=True)
    a = llm.add_request(base, sp)
    llm.step()
    while not any(o.request_id == a and len(o.outputs[0].token_ids) >= 3 for o in llm.step()):
        pass
    llm.add_request(base[:block_size] + _prompt(30, 2), SamplingParams(n=2, temperature=1.0, seed=4, max_tokens=8,
                                                                      ignore_eos=True))
    llm.add_request(_prompt(5, 3), SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=8, ignore_eos=True))
    while llm.has_unfinished_requests():
        llm.step()
    assert llm.kv_stats()["prefix_hit_tokens"] >= block_size
    assert sum(len(c) == 40 for c, _ in records) == 1  # a's prompt was prefilled once
    _check(records, tiny_dense)


def test_engine_logits_equal_dense_after_block_churn(tiny_ckpt, tiny_dense):
    """Blocks handed out after earlier requests finished and were partly evicted: scattered block tables,
    a tiny pool (preemption), every row still equals the dense model."""
    llm = LLM(tiny_ckpt, dtype="float32", device="cpu", block_size=16, kv_cache_memory=12 * 8192)
    warm = [_prompt(n, 10 + n) for n in (20, 45, 33)]
    llm.generate(warm, SamplingParams(temperature=1.0, seed=1, max_tokens=12, ignore_eos=True), use_tqdm=False)
    records = _capture(llm)
    prompts = [_prompt(36, 20), warm[1][:32] + _prompt(9, 21), _prompt(18, 22)]
    params = [SamplingParams(n=k, temperature=1.0, seed=30 + k, max_tokens=20, ignore_eos=True) for k in (3, 2, 2)]
    llm.generate(prompts, params, use_tqdm=False)
    assert llm.kv_stats()["preemptions"] > 0
    _check(records, tiny_dense)


@pytest.mark.parametrize("num_blocks,max_batched", [(4, 16), (5, 16)])
def test_engine_logits_equal_dense_chunked_recompute_after_preemption(tiny_ckpt, tiny_dense, num_blocks, max_batched):
    """Many samples in a pool of a few blocks with a small step budget: preempted samples come back through
    chunked prefill of prompt + output (some chunks end one token short of the end). Every row must still
    be the dense model's."""
    llm = LLM(tiny_ckpt, dtype="float32", device="cpu", block_size=16, kv_cache_memory=num_blocks * 8192,
              max_num_batched_tokens=max_batched)
    records = _capture(llm)
    llm.generate(_prompt(15, 5), SamplingParams(n=17, temperature=1.0, top_p=0.9, seed=918, max_tokens=20,
                                                ignore_eos=True), use_tqdm=False)
    assert llm.kv_stats()["preemptions"] > 0
    _check(records, tiny_dense)

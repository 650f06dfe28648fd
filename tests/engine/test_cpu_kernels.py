"""The engine's CPU default (packed linears, native norms, the C++ cascade kernel; in fp32 the whole decoder
stack in one native call per pure-decode step) against its plain PyTorch path (cpu_kernels=False): same
tokens for greedy and seeded sampling with forked samples, chunked prefill and a second prompt decoding beside
the group, and the same log-probabilities."""

from __future__ import annotations

import pytest

from step3vl import LLM, SamplingParams
import step3vl_native
from step3vl.engine.attention import CpuPagedAttention, TorchPagedAttention


def _llm(ckpt, dtype: str, cpu_kernels: bool) -> LLM:
    llm = LLM(ckpt, dtype=dtype, device="cpu", kv_cache_memory=256 * 8192, block_size=16,
              max_num_batched_tokens=24, cpu_kernels=cpu_kernels)
    runner = llm.engine.runner
    native = cpu_kernels and step3vl_native.cpu_has_avx512()
    assert runner.backend is (CpuPagedAttention if native else TorchPagedAttention)
    fused = native and dtype == "float32"
    assert (runner.decode_stack is not None) == fused
    return llm


def _run(ckpt, dtype: str, cpu_kernels: bool, prompts, params):
    outs = _llm(ckpt, dtype, cpu_kernels).generate(prompts, params, use_tqdm=False)
    return [[c.token_ids for c in o.outputs] for o in outs]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_native_decode_matches_torch_path(qwen3_ckpt, dtype, temperature):
    ckpt, _ = qwen3_ckpt
    prompts = [list(range(5, 45)), list(range(100, 109))]
    params = SamplingParams(n=4, temperature=temperature, max_tokens=12, ignore_eos=True, seed=7)
    want = _run(ckpt, dtype, False, prompts, params)
    got = _run(ckpt, dtype, True, prompts, params)
    assert got == want
    if temperature > 0:
        assert len({tuple(t) for t in got[0]}) > 1, "forked samples should differ under sampling"


def test_native_logprobs_match_torch_path(qwen3_ckpt):
    ckpt, _ = qwen3_ckpt
    params = SamplingParams(n=3, temperature=1.0, max_tokens=10, ignore_eos=True, seed=3, logprobs=2)
    outs = [_llm(ckpt, "float32", k).generate([list(range(7, 50))], params, use_tqdm=False)[0] for k in (False, True)]
    for want, got in zip(outs[0].outputs, outs[1].outputs):
        assert got.token_ids == want.token_ids
        assert len(want.logprobs) == len(got.logprobs) == 10
        for a, b in zip(want.logprobs, got.logprobs):
            assert a.keys() == b.keys()
            for t in a:
                assert abs(a[t] - b[t]) < 1e-4


def test_long_generations_match_torch_path(qwen3_ckpt):
    """Suffixes past 256 tokens are split into chunks across threads; the tokens stay those of the torch path."""
    ckpt, _ = qwen3_ckpt
    params = SamplingParams(n=3, temperature=0.8, max_tokens=300, ignore_eos=True, seed=11)
    want, got = (_run(ckpt, "float32", k, [list(range(3, 40))], params) for k in (False, True))
    assert got == want
    assert all(len(t) == 300 for t in got[0])

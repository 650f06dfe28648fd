"""The engine's CPU default (decode through the C++ cascade kernel) against its plain PyTorch path
(cpu_kernels=False): same tokens for greedy and for seeded sampling with forked samples, chunked prefill and
a second prompt decoding beside the group."""

from __future__ import annotations

import pytest

from step3vl import LLM, SamplingParams
from step3vl.engine.attention import CpuPagedAttention, TorchPagedAttention


def _run(ckpt, dtype: str, cpu_kernels: bool, prompts, params):
    llm = LLM(ckpt, dtype=dtype, device="cpu", kv_cache_memory=256 * 8192, block_size=16,
              max_num_batched_tokens=24, cpu_kernels=cpu_kernels)
    assert llm.engine.runner.backend is (CpuPagedAttention if cpu_kernels else TorchPagedAttention)
    return [[c.token_ids for c in o.outputs] for o in llm.generate(prompts, params, use_tqdm=False)]


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

"""The sampler's per-request rules on a CUDA engine (Triton kernels on): penalties, allowed ids / logit bias /
min_tokens, structured outputs and prompt log-probs give what the CPU engine gives on the same fp32 weights."""

from __future__ import annotations

import json

import pytest
import torch

from step3vl.engine import LLM, SamplingParams
from step3vl.tools.make_tiny_checkpoint import make_tiny_checkpoint

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"], "additionalProperties": False}


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    ckpt = make_tiny_checkpoint(tmp_path_factory.mktemp("rules-gpu"), preset="tiny", seed=0, shards=1)
    return (LLM(ckpt, dtype="float32", device="cpu", kv_cache_memory="16MiB"),
            LLM(ckpt, dtype="float32", device="cuda", kv_cache_memory="16MiB"))


def _xgrammar():
    return pytest.importorskip("xgrammar", reason="structured outputs need xgrammar (a dependency this machine lacks)")


@pytest.mark.parametrize("rules", [
    dict(repetition_penalty=1.6, presence_penalty=0.8, frequency_penalty=0.4),
    dict(allowed_token_ids=list(range(60, 90)), logit_bias={70: 2.0}, min_tokens=12),
    dict(structured_outputs={"regex": r"[a-c]+[0-9]{2}"}),
], ids=["penalties", "constraints", "regex"])
def test_greedy_with_rules_equals_the_cpu_engine(engines, rules):
    if "structured_outputs" in rules:
        _xgrammar()
    cpu, gpu = engines
    params = SamplingParams(temperature=0, max_tokens=16, **rules)
    want = cpu.generate(["Count:"], params, use_tqdm=False)[0].outputs[0].token_ids
    got = gpu.generate(["Count:"], params, use_tqdm=False)[0].outputs[0].token_ids
    assert got == want


def test_sampled_json_parses_on_cuda(engines):
    _xgrammar()
    _, gpu = engines
    out = gpu.generate(["Answer:"], SamplingParams(n=8, seed=1, max_tokens=120, structured_outputs={"json": SCHEMA}),
                       use_tqdm=False)[0]
    done = [c.text for c in out.outputs if c.finish_reason == "stop"]
    assert done and all(isinstance(json.loads(t)["n"], int) for t in done)


def test_prompt_logprobs_match_the_cpu_engine(engines):
    cpu, gpu = engines
    params = SamplingParams(max_tokens=1, prompt_logprobs=3)
    want = cpu.generate(["a longer prompt to score, token by token"], params, use_tqdm=False)[0]
    got = gpu.generate(["a longer prompt to score, token by token"], params, use_tqdm=False)[0]
    assert got.prompt_logprobs[0] is None
    for w, g in zip(want.prompt_logprobs[1:], got.prompt_logprobs[1:]):
        assert w.keys() == g.keys()
        assert all(abs(w[t] - g[t]) < 1e-3 for t in w)

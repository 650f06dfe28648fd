"""The engine's GPU attention path (Triton KV write, cascade or plain paged decode, paged prefill, fused
vision attention) driven end to end. Without a GPU the kernels run through the Triton interpreter on CPU
tensors, so the integration logic (metadata, tables, groups, chunked prefill, images) is checked here; the
device run is in tests/gpu."""

from __future__ import annotations

import os

import pytest
import torch

from step3vl import LLM, SamplingParams

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs a CUDA device or the Triton interpreter (TRITON_INTERPRET=1, set by tests/conftest.py)")


def _run(ckpt, use_kernels: bool, cascade: bool, prompts, params):
    # cpu_kernels=False: without Triton kernels the engine runs the plain PyTorch path, the reference here.
    llm = LLM(ckpt, dtype="float32", device="cuda" if torch.cuda.is_available() else "cpu",
              kv_cache_memory=256 * 8192, block_size=16, max_num_batched_tokens=24,
              use_kernels=use_kernels, cascade_attention=cascade, cpu_kernels=False)
    return [[c.token_ids for c in o.outputs] for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize("cascade", [True, False])
def test_kernel_path_matches_torch_path(qwen3_ckpt, cascade):
    ckpt, _ = qwen3_ckpt
    # Forked samples share a 2-block prefix (cascade groups); a second prompt decodes beside them; a
    # 24-token budget chunks the 40-token prompt's prefill across steps.
    prompts = [list(range(5, 45)), list(range(100, 109))]
    params = SamplingParams(n=3, temperature=0.0, max_tokens=6, ignore_eos=True)
    want = _run(ckpt, False, True, prompts, params)
    got = _run(ckpt, True, cascade, prompts, params)
    assert got == want


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU (the fused vision kernel over 2704 tokens takes minutes interpreted)")
def test_kernel_path_with_an_image(tiny_ckpt):
    from step3vl.processor import IMAGE_PLACEHOLDER

    img = (torch.arange(3 * 40 * 50) % 251).reshape(40, 50, 3).to(torch.uint8).numpy()
    prompt = [{"prompt": f"look {IMAGE_PLACEHOLDER} now", "images": [img]}]
    params = SamplingParams(n=2, temperature=0.0, max_tokens=3, ignore_eos=True)
    assert _run(tiny_ckpt, True, True, prompt, params) == _run(tiny_ckpt, False, True, prompt, params)

"""Decoder parity: step3vl's Qwen3 decoder against transformers' Qwen3ForCausalLM on the same checkpoint.

A tiny random HF model is saved with `save_pretrained` (a plain Qwen3 config.json → a text-only step3vl model),
loaded with `step3vl.loader.load_model`, and a packed batch of prompts of different lengths (positions restart
per prompt, `DenseAttention(seq_lens)`) must give HF's per-prompt logits.
"""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from step3vl.loader import load_model
from step3vl.model import DenseAttention

VOCAB = 300
PROMPT_LENS = [7, 23, 1, 14]


def _hf_model(tie: bool, seed: int = 0) -> Qwen3ForCausalLM:
    cfg = Qwen3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}, tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg).eval()
    # HF initialises every norm weight to 1; randomise all of them so q_norm/k_norm/... are really exercised.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def saved(request, tmp_path_factory):
    model = _hf_model(tie=request.param)
    path = tmp_path_factory.mktemp("qwen3")
    model.save_pretrained(path, safe_serialization=True)
    return model, path


def _prompts(seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g) for n in PROMPT_LENS]


def _hf_logits(model: Qwen3ForCausalLM, prompts: list[torch.Tensor]) -> torch.Tensor:
    outs = [model(input_ids=p[None], use_cache=False).logits[0] for p in prompts]
    return torch.cat(outs)


def _step3vl_logits(model, prompts: list[torch.Tensor]) -> torch.Tensor:
    ids = torch.cat(prompts)
    positions = torch.cat([torch.arange(len(p)) for p in prompts])
    hidden = model(ids, positions, DenseAttention([len(p) for p in prompts]))
    return model.compute_logits(hidden)


@torch.inference_mode()
def test_fp32_logits_match_transformers(saved):
    hf, path = saved
    ours = load_model(path, dtype=torch.float32)
    assert not ours.cfg.has_vision
    prompts = _prompts()
    ref = _hf_logits(hf, prompts)
    got = _step3vl_logits(ours, prompts)
    assert got.shape == (sum(PROMPT_LENS), VOCAB)
    assert ref.abs().max() > 1.0  # the comparison is not between near-zero tensors
    assert (got - ref).abs().max().item() <= 1e-5


@torch.inference_mode()
def test_bf16_logits_match_transformers(saved):
    hf, path = saved
    ours = load_model(path, dtype=torch.bfloat16)
    assert ours.dtype == torch.bfloat16
    hf16 = _hf_model(tie=hf.config.tie_word_embeddings).to(torch.bfloat16)
    hf16.load_state_dict(hf.state_dict())
    prompts = _prompts()
    ref = _hf_logits(hf16, prompts).float()
    got = _step3vl_logits(ours, prompts)
    assert got.dtype == torch.bfloat16
    got = got.float()
    # Norms, projections and RoPE are bit-identical to HF in bf16; the attention output differs by an ulp
    # (CPU SDPA kernel and layout choice), which grows to ~1-1.4% of the largest logit over 3 layers.
    scale = ref.abs().max().item()
    assert (got - ref).abs().max().item() <= 0.03 * scale
    # And bf16 stays close to the fp32 result.
    ref32 = _hf_logits(hf, prompts)
    assert (got - ref32).abs().max().item() <= 0.05 * scale


@torch.inference_mode()
def test_packing_is_independent_of_neighbours(saved):
    """A prompt's logits do not depend on which prompts share its packed batch, nor on their order."""
    _, path = saved
    ours = load_model(path, dtype=torch.float32)
    prompts = _prompts()
    together = _step3vl_logits(ours, prompts).split(PROMPT_LENS)
    reordered = _step3vl_logits(ours, prompts[::-1]).split(PROMPT_LENS[::-1])[::-1]
    for i, p in enumerate(prompts):
        alone = _step3vl_logits(ours, [p])
        torch.testing.assert_close(together[i], alone, atol=1e-5, rtol=0)
        torch.testing.assert_close(reordered[i], alone, atol=1e-5, rtol=0)


@torch.inference_mode()
def test_positions_are_used(saved):
    """Positions reach RoPE: a constant shift keeps the logits (RoPE is relative) and matches HF given the same
    position_ids, while reversed positions change them."""
    hf, path = saved
    ours = load_model(path, dtype=torch.float32)
    p = _prompts()[1]
    n = len(p)
    base = ours.compute_logits(ours(p, torch.arange(n), DenseAttention([n])))
    shifted = ours.compute_logits(ours(p, torch.arange(n) + 100, DenseAttention([n])))
    torch.testing.assert_close(shifted, base, atol=1e-4, rtol=0)
    ref = hf(input_ids=p[None], position_ids=(torch.arange(n) + 100)[None], use_cache=False).logits[0]
    assert (shifted - ref).abs().max().item() <= 1e-5
    scrambled = ours.compute_logits(ours(p, torch.arange(n).flip(0), DenseAttention([n])))
    assert (scrambled - base).abs().max().item() > 1e-2


def test_dense_attention_rejects_wrong_lengths():
    attn = DenseAttention([3, 4])
    q = torch.zeros(6, 4, 8)
    kv = torch.zeros(6, 2, 8)
    with pytest.raises(ValueError, match="sum to 7"):
        attn(0, q, kv, kv, 1.0)

"""Shared fixtures for the training tests: the generated tiny STEP3-VL checkpoint and its processor, a random
transformers Qwen3 saved as a checkpoint (the independent reference for losses and gradients), small images."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from step3vl.processor import Step3VLProcessor
from step3vl.tools.make_tiny_checkpoint import make_tiny_checkpoint

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
QWEN3_VOCAB = 512  # the tiny tokenizer's size: every id it produces is a valid model id


@pytest.fixture(autouse=True, scope="module")
def _tiny_shapes_one_thread(one_torch_thread):
    pass


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """The `tiny` preset (vision + decoder + tokenizer), 2 shards. Treat as read-only."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("train-tiny"), preset="tiny", seed=0, shards=2)


@pytest.fixture(scope="session")
def processor(tiny_ckpt) -> Step3VLProcessor:
    return Step3VLProcessor.from_pretrained(tiny_ckpt)


@pytest.fixture(scope="session")
def qwen3_ckpt(tmp_path_factory, tiny_ckpt) -> Path:
    """A random transformers Qwen3ForCausalLM written with save_pretrained (fp32), plus the tiny tokenizer.
    The `hf_qwen3` fixture loads it back, fresh for each test."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(
        vocab_size=QWEN3_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0}, tie_word_embeddings=False,
        eos_token_id=None, bos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(cfg)
    with torch.no_grad():  # larger than HF's init, so the gradients are not all near zero
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if name.endswith("norm.weight") else 0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("train-qwen3")
    model.save_pretrained(path, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(tiny_ckpt / name, path / name)
    return path


@pytest.fixture
def hf_qwen3(qwen3_ckpt):
    """The transformers model of `qwen3_ckpt`, freshly loaded (its own parameters and gradients), fp32."""
    from transformers import Qwen3ForCausalLM

    # Eager attention: an implementation independent of the SDPA call our DenseAttention makes.
    return Qwen3ForCausalLM.from_pretrained(qwen3_ckpt, attn_implementation="eager", dtype=torch.float32).train()


def _image(w: int = 60, h: int = 40, seed: int = 0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


@pytest.fixture(scope="session")
def make_image():
    """`make_image(w=60, h=40, seed=0)`: a small random RGB image (small enough that no crops are made)."""
    return _image

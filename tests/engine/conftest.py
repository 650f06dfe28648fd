"""Shared fixtures for the engine tests: the generated tiny STEP3-VL checkpoint, a random transformers Qwen3
saved as a checkpoint (with the tiny tokenizer files), and an independent dense reference of the model."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from step3vl.tools.make_tiny_checkpoint import make_tiny_checkpoint

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
QWEN3_VOCAB = 512  # the tiny tokenizer's size: every id it can produce is a valid model id


@pytest.fixture(autouse=True, scope="module")
def _tiny_shapes_one_thread(one_torch_thread):
    pass


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """The `tiny` preset (vision + decoder + tokenizer). Treat as read-only."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("engine-tiny"), preset="tiny", seed=0, shards=2)


def _random_qwen3(seed: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(
        vocab_size=QWEN3_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0}, tie_word_embeddings=False,
        eos_token_id=None, bos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg).eval()
    # Larger than HF's init so the logits are peaked: greedy choices are not decided by rounding noise.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="session")
def qwen3_ckpt(tmp_path_factory, tiny_ckpt):
    """(dir, transformers model): a random Qwen3ForCausalLM saved with save_pretrained, plus tokenizer files."""
    model = _random_qwen3(seed=0)
    path = tmp_path_factory.mktemp("engine-qwen3")
    model.save_pretrained(path, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(tiny_ckpt / name, path / name)
    return path, model


class DenseReference:
    """The checkpoint's model run densely (`DenseAttention`, no cache) over whole token sequences, fp32.
    Independent of the engine's paging, scheduling and sampling."""

    def __init__(self, path: Path):
        from step3vl.loader import load_model

        self.model = load_model(path, dtype=torch.float32)

    @torch.inference_mode()
    def logits(self, seqs: list[list[int]], image_features: list[torch.Tensor | None] | None = None) -> list[torch.Tensor]:
        """Per sequence, logits [len, vocab] for every position (packed in one forward). A sequence's image
        features [N, hidden] go on its first N `<im_patch>` positions (the prompt's); generated `<im_patch>`
        ids are ordinary tokens, as in the engine."""
        from step3vl.model import DenseAttention

        image_features = image_features or [None] * len(seqs)
        embeds = []
        for s, feats in zip(seqs, image_features):
            ids = torch.tensor(s)
            x = self.model.model.embed_tokens(ids)
            if feats is not None:
                rows = (ids == self.model.cfg.image_token_id).nonzero()[:, 0][:feats.shape[0]]
                assert len(rows) == feats.shape[0], "fewer <im_patch> tokens than image feature rows"
                x[rows] = feats.to(x.dtype)
            embeds.append(x)
        positions = torch.cat([torch.arange(len(s)) for s in seqs])
        hidden = self.model.model(torch.cat(embeds), positions, DenseAttention([len(s) for s in seqs]))
        return list(self.model.compute_logits(hidden).float().split([len(s) for s in seqs]))

    def last_logits(self, seqs: list[list[int]]) -> torch.Tensor:
        return torch.stack([lg[-1] for lg in self.logits(seqs)])

    @torch.inference_mode()
    def greedy(self, prompt: list[int], max_tokens: int, image_features: torch.Tensor | None = None) -> list[int]:
        """Greedy decoding by recomputing the whole sequence every token."""
        ids = list(prompt)
        for _ in range(max_tokens):
            ids.append(int(self.logits([ids], [image_features])[0][-1].argmax()))
        return ids[len(prompt):]


@pytest.fixture(scope="session")
def tiny_dense(tiny_ckpt) -> DenseReference:
    return DenseReference(tiny_ckpt)


@pytest.fixture(scope="session")
def qwen3_dense(qwen3_ckpt) -> DenseReference:
    return DenseReference(qwen3_ckpt[0])

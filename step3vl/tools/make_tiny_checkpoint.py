"""Write a randomly initialised STEP3-VL checkpoint in the official on-disk format.

    python -m step3vl.tools.make_tiny_checkpoint DIR --preset tiny|small|small-vl [--seed 0] [--shards 2]

`tiny` (a few hundred thousand parameters) is for tests; `small` (a ~50M-parameter decoder) for benchmarks.
The directory gets config.json, sharded safetensors with the official key names and an index, and tokenizer
files (a small byte-level BPE with the image special tokens, `</think>` and a ChatML chat template).
The weights are random: outputs are gibberish by construction.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from tokenizers import Tokenizer

from step3vl.config import Step3VLConfig
from step3vl.model.vlm import Step3VLForCausalLM
from step3vl.saver import write_shards
from step3vl.tools.tiny_tokenizer import write_tiny_tokenizer

PRESETS = {
    "tiny": dict(
        tokenizer_vocab=512,
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=4096),
        vision=dict(width=32, layers=2, heads=2, mlp_ratio=2.0),
    ),
    "small": dict(
        tokenizer_vocab=8192,
        text=dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=12,
                  num_key_value_heads=4, head_dim=64, max_position_embeddings=8192),
        vision=dict(width=64, layers=2, heads=4, mlp_ratio=2.0),
    ),
    # The small decoder with a vision tower that costs, per image, about what STEP3-VL's does against its decoder
    # (~3.6x the decoder's prefill FLOPs over the image's rows: the ViT sees 16 patches per image row). For
    # benchmarks of image work (bench/images.py).
    "small-vl": dict(
        tokenizer_vocab=8192,
        text=dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=12,
                  num_key_value_heads=4, head_dim=64, max_position_embeddings=8192),
        vision=dict(width=256, layers=12, heads=4, mlp_ratio=4.0),
    ),
    # The demo model of the `shapes` task (step3vl/tasks/shapes.py): small enough to train from scratch on a 2-core
    # CPU in the recipe's budget. 128 px global view in 8 px patches (16x16 -> 4x4 = 16 image tokens), no crops.
    "shapes": dict(
        tokenizer_vocab=1024,
        text=dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, max_position_embeddings=4096),
        vision=dict(width=128, layers=4, heads=4, mlp_ratio=4.0, image_size=128, patch_size=8, use_crops=False),
    ),
    # The shapes geometry at test size: the recipe's smoke test.
    "shapes-tiny": dict(
        tokenizer_vocab=512,
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=4096),
        vision=dict(width=32, layers=2, heads=2, mlp_ratio=2.0, image_size=64, patch_size=8, use_crops=False),
    ),
}


def build_config(preset: str, vocab_size: int, image_token_id: int, eos_ids: list[int]) -> dict:
    p = PRESETS[preset]
    text = dict(model_type="qwen3", vocab_size=vocab_size, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
                hidden_act="silu", tie_word_embeddings=False, eos_token_id=eos_ids, torch_dtype="bfloat16",
                **p["text"])
    vision = dict(num_channels=3, image_size=728, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                  ues_cls_token=False, use_ln_pre=True, use_ln_post=False, use_abs_posemb=True, use_rope2d=True,
                  ls_init_value=0.1, rope_theta=10000.0)
    vision.update(p["vision"])
    return dict(model_type="step_robotics", architectures=["StepVLForConditionalGeneration"],
                vision_config=vision, text_config=text, understand_projector_stride=2, projector_bias=False,
                image_token_id=image_token_id, torch_dtype="bfloat16")


def random_state_dict(cfg: Step3VLConfig, seed: int, for_training: bool = False) -> dict[str, torch.Tensor]:
    """for_training: a start for training from scratch (norms 1, biases 0) instead of weights whose every
    entry is random (what tests and benchmarks want, so no code path sees a trivial value)."""
    torch.manual_seed(seed)
    model = Step3VLForCausalLM(cfg)
    state = {}
    for name, t in model.state_dict().items():
        is_norm = t.dim() == 1 and ("norm" in name or "ln_" in name) and name.endswith("weight")
        if name.endswith("gamma"):
            value = torch.full_like(t, 0.1)
        elif is_norm:
            value = torch.ones_like(t) if for_training else 1.0 + 0.1 * torch.randn_like(t)
        elif t.dim() == 1:
            value = torch.zeros_like(t) if for_training else 0.02 * torch.randn_like(t)
        else:
            std = _vision_init_std(cfg, name) if for_training else None
            value = torch.randn_like(t) * (std or 0.02)
        state[name] = value.to(torch.bfloat16).contiguous()
    return state


def _vision_init_std(cfg: Step3VLConfig, name: str) -> float | None:
    """open_clip's ViT initialisation, for training from scratch (None: the default 0.02). At 0.02 a narrow ViT's
    attention logits start near zero, so its attention stays uniform for long and the tower learns colours (one
    patch says them) long before shapes (patches must be combined): a probe classifying the kind of one shape
    reached 57% after 500 steps with 0.02 everywhere and 71% with this (chance is 25%)."""
    v = cfg.vision
    if v is None or not name.startswith("vision_model."):
        return None
    if "attn.in_proj_weight" in name:
        return v.width ** -0.5
    if "out_proj.weight" in name or "c_proj.weight" in name:
        return v.width ** -0.5 * (2 * v.layers) ** -0.5
    if "c_fc.weight" in name:
        return (2 * v.width) ** -0.5
    if name.endswith("conv1.weight"):
        return (3 * v.patch_size ** 2) ** -0.5
    return None


def make_tiny_checkpoint(out: str | Path, preset: str = "tiny", seed: int = 0, shards: int = 2,
                         corpus: list[str] | None = None, for_training: bool = False) -> Path:
    """corpus: the texts the tokenizer's BPE merges are learned from (default: its built-in corpus);
    for_training: initialise to train from scratch (see random_state_dict)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ids = write_tiny_tokenizer(out, vocab_size=PRESETS[preset]["tokenizer_vocab"], corpus=corpus)
    tok_size = Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size()
    # Padded like real checkpoints' embedding tables (the tokenizer may learn fewer merges than asked).
    vocab = 64 * math.ceil(max(tok_size, PRESETS[preset]["tokenizer_vocab"]) / 64)
    eos = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    config = build_config(preset, vocab, ids["<im_patch>"], eos)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "temperature": 1.0,
                                                            "top_p": 1.0, "top_k": 0}, indent=2))
    state = random_state_dict(Step3VLConfig.from_dict(config), seed, for_training)
    write_shards(state, out, shards)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir")
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shards", type=int, default=2)
    args = ap.parse_args(argv)
    path = make_tiny_checkpoint(args.dir, args.preset, args.seed, args.shards)
    print(f"wrote {args.preset} checkpoint to {path} (random weights)")


if __name__ == "__main__":
    main()

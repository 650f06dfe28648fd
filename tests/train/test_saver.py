"""Model → checkpoint directory (saver.py) and in-memory state → model (loader.model_from_state), checked by
loading the result back and by comparing with the source checkpoint's own files and key names."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from step3vl import saver
from step3vl.config import Step3VLConfig
from step3vl.loader import (INDEX_FILE, CheckpointError, check_state, checkpoint_files, load_model, model_from_state,
                            tensor_entries)
from step3vl.saver import export_state, save_checkpoint

COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


@pytest.fixture
def trained(tiny_ckpt):
    """The tiny model in fp32 with weights off the bf16 grid (as after training)."""
    model = load_model(tiny_ckpt, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=g))
    assert not torch.equal(model.lm_head.weight, model.lm_head.weight.to(torch.bfloat16).float())
    return model


def _stored(path) -> dict[str, str]:
    """key → safetensors dtype string, over every shard of a checkpoint directory."""
    return {e.key: e.dtype for f in checkpoint_files(path) for e in tensor_entries(f)}


def test_fp32_round_trip_is_exact(trained, tiny_ckpt, tmp_path):
    out = save_checkpoint(trained, tmp_path / "out", tiny_ckpt, dtype=None)
    assert set(_stored(out).values()) == {"F32"}
    back = load_model(out, dtype=torch.float32)
    want = dict(trained.named_parameters())
    got = dict(back.named_parameters())
    assert set(got) == set(want)
    for name, p in got.items():
        assert torch.equal(p, want[name]), name


def test_default_bf16_equals_the_weights_cast(trained, tiny_ckpt, tmp_path):
    out = save_checkpoint(trained, tmp_path / "out", tiny_ckpt)
    assert set(_stored(out).values()) == {"BF16"}
    back = load_model(out)  # bf16
    for name, p in back.named_parameters():
        assert torch.equal(p, dict(trained.named_parameters())[name].to(torch.bfloat16)), name


def test_official_key_names_and_index(trained, tiny_ckpt, tmp_path):
    out = save_checkpoint(trained, tmp_path / "out", tiny_ckpt, shards=3)
    source_index = json.loads((tiny_ckpt / INDEX_FILE).read_text())
    index = json.loads((out / INDEX_FILE).read_text())
    # The same names as the generated official-format checkpoint, each in exactly one listed shard.
    assert set(index["weight_map"]) == set(source_index["weight_map"]) == set(_stored(out))
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    sizes = sum(e.nbytes for f in checkpoint_files(out) for e in tensor_entries(f))
    assert index["metadata"]["total_size"] == sizes
    assert set(export_state(trained)) == set(source_index["weight_map"])


def test_config_and_tokenizer_files_are_copied_weights_are_not(trained, tiny_ckpt, tmp_path):
    out = save_checkpoint(trained, tmp_path / "out", tiny_ckpt, shards=1)
    for name in COPIED:
        assert (out / name).read_bytes() == (tiny_ckpt / name).read_bytes(), name
    # Only the new shard and index: none of the source's two shards came along.
    weights = sorted(p.name for p in out.iterdir() if p.name.endswith(".safetensors"))
    assert weights == ["model-00001-of-00001.safetensors"]


def test_source_cannot_be_the_target(trained, tiny_ckpt, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_ckpt, src)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    with pytest.raises(ValueError, match="source"):
        save_checkpoint(trained, src, src)
    with pytest.raises(ValueError, match="source"):
        save_checkpoint(trained, tmp_path / "src" / ".." / "src", src)  # another spelling of the same directory
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


def test_source_without_config_is_an_error(trained, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        save_checkpoint(trained, tmp_path / "out", tmp_path / "empty")
    assert not (tmp_path / "out").exists()


def test_existing_target_is_replaced_whole(trained, tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(tiny_ckpt, out)  # an older checkpoint: 2 shards, plus a stray file
    (out / "stale.txt").write_text("old")
    (tmp_path / "out.tmp").mkdir()  # left over from an earlier crash
    (tmp_path / "out.tmp" / "junk.safetensors").write_text("x")
    save_checkpoint(trained, out, tiny_ckpt, dtype=None, shards=1)
    assert sorted(p.name for p in out.iterdir()) == sorted([INDEX_FILE, "model-00001-of-00001.safetensors",
                                                             *(p.name for p in tiny_ckpt.iterdir()
                                                               if not p.name.startswith("model"))])
    assert not (tmp_path / "out.tmp").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert torch.equal(load_model(out, dtype=torch.float32).lm_head.weight, trained.lm_head.weight)


def test_a_failed_save_keeps_the_existing_target(trained, tiny_ckpt, tmp_path, monkeypatch):
    out = save_checkpoint(trained, tmp_path / "out", tiny_ckpt, dtype=None)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(saver, "write_shards", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(load_model(tiny_ckpt, dtype=torch.float32), out, tiny_ckpt)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_tied_embeddings_are_written_once(tiny_ckpt, tmp_path):
    src = tmp_path / "tied-src"
    src.mkdir()
    config = json.loads((tiny_ckpt / "config.json").read_text())
    config["text_config"]["tie_word_embeddings"] = True
    (src / "config.json").write_text(json.dumps(config))
    cfg = Step3VLConfig.from_pretrained(src)
    state = {k: v for k, v in export_state(load_model(tiny_ckpt, dtype=torch.float32), None).items()
             if k != "lm_head.weight"}
    model = model_from_state(cfg, state, dtype=torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    out = save_checkpoint(model, tmp_path / "tied", src, dtype=None)
    assert "lm_head.weight" not in _stored(out) and "model.embed_tokens.weight" in _stored(out)
    back = load_model(out, dtype=torch.float32)
    assert back.lm_head.weight is back.model.embed_tokens.weight
    assert torch.equal(back.lm_head.weight, model.model.embed_tokens.weight)


# -- in-memory state → model -----------------------------------------------------------------------------

@pytest.fixture
def cfg_and_state(tiny_ckpt, trained):
    return Step3VLConfig.from_pretrained(tiny_ckpt), export_state(trained, dtype=None)


def test_model_from_state_reproduces_the_weights(cfg_and_state, trained):
    cfg, state = cfg_and_state
    model = model_from_state(cfg, state, dtype=torch.float32)
    for name, p in model.named_parameters():
        assert torch.equal(p, dict(trained.named_parameters())[name]), name
        assert not p.requires_grad
    assert torch.equal(model.model.inv_freq, trained.model.inv_freq)  # non-persistent buffers rebuilt
    bf16 = model_from_state(cfg, state)  # default dtype
    assert bf16.dtype == torch.bfloat16
    assert torch.equal(bf16.lm_head.weight, trained.lm_head.weight.to(torch.bfloat16))
    # The copy is independent of the source tensors.
    state["lm_head.weight"].zero_()
    assert bf16.lm_head.weight.abs().sum() > 0


def test_remote_code_names_are_accepted(cfg_and_state, trained):
    cfg, state = cfg_and_state
    remote = {}
    for k, v in state.items():
        if k.startswith(("model.", "vision_model.", "vit_large_projector.")):
            k = "model." + k.replace("model.", "language_model.", 1) if k.startswith("model.") else "model." + k
        remote[k] = v
    assert any(k.startswith("model.language_model.") for k in remote)
    assert any(k.startswith("model.vision_model.") for k in remote)
    assert set(check_state(cfg, remote)) == set(state)
    model = model_from_state(cfg, remote, dtype=torch.float32)
    for name, p in model.named_parameters():
        assert torch.equal(p, dict(trained.named_parameters())[name]), name


def test_wrong_key_is_named(cfg_and_state):
    cfg, state = cfg_and_state
    state["model.layers.0.mlp.bogus.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"trainer: unexpected key 'model\.layers\.0\.mlp\.bogus\.weight'"):
        model_from_state(cfg, state, where="trainer")


def test_wrong_shape_is_named(cfg_and_state):
    cfg, state = cfg_and_state
    key = "model.layers.1.self_attn.k_proj.weight"
    state[key] = state[key][:-1]
    with pytest.raises(CheckpointError, match=rf"key '{key}' has shape \[31, 64\], the model expects \[32, 64\]"):
        check_state(cfg, state)


def test_missing_and_non_float_keys_are_named(cfg_and_state):
    cfg, state = cfg_and_state
    good = dict(state)
    del state["model.norm.weight"]
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\).*model\.norm\.weight"):
        check_state(cfg, state)
    good["model.norm.weight"] = good["model.norm.weight"].to(torch.int32)
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' has dtype torch\.int32"):
        model_from_state(cfg, good)

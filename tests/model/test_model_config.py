"""Config parsing: the official config.json shape, a plain Qwen3 one, and errors that name the field."""

from __future__ import annotations

import copy
import json

import pytest

from step3vl.config import ConfigError, Step3VLConfig


def official() -> dict:
    """config.json as STEP3-VL-10B ships it (MODEL.md): misspelled ues_cls_token, mlp_ratio, Qwen3 text_config."""
    return {
        "model_type": "step_robotics",
        "architectures": ["StepVLForConditionalGeneration"],
        "vision_config": {
            "width": 1536, "layers": 47, "heads": 16, "num_channels": 3, "image_size": 728,
            "mlp_ratio": 8960 / 1536, "patch_size": 14, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
            "ues_cls_token": False, "use_ln_pre": True, "use_ln_post": False, "use_abs_posemb": True,
            "use_rope2d": True, "ls_init_value": 0.1,
        },
        "text_config": {
            "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288,
            "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
            "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_scaling": None, "max_position_embeddings": 65536,
            "tie_word_embeddings": False, "hidden_act": "silu", "eos_token_id": 151645,
        },
        "understand_projector_stride": 2,
        "projector_bias": False,
        "image_token_id": 151679,
    }


def test_official_config_parses_to_model_md_shapes():
    cfg = Step3VLConfig.from_dict(official())
    v, t = cfg.vision, cfg.text
    assert cfg.has_vision and cfg.image_token_id == 151679 and cfg.projector_bias is False
    assert (v.width, v.layers, v.heads, v.head_dim, v.intermediate_size) == (1536, 47, 16, 96, 8960)
    assert (v.grid_size, v.patch_size, v.hidden_act, v.rope_theta) == (52, 14, "quick_gelu", 1e4)
    assert v.use_cls_token is False
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads, t.head_dim) == \
        (4096, 36, 32, 8, 128)
    assert (t.rope_theta, t.rms_norm_eps, t.vocab_size, t.max_position_embeddings) == (1e6, 1e-6, 151936, 65536)
    assert t.eos_token_id == [151645] and t.tie_word_embeddings is False


def test_transformers5_rope_parameters_are_read():
    d = official()
    del d["text_config"]["rope_theta"], d["text_config"]["rope_scaling"]
    d["text_config"]["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e5}
    assert Step3VLConfig.from_dict(d).text.rope_theta == 5e5


def test_plain_qwen3_config_is_text_only():
    cfg = Step3VLConfig.from_dict(official()["text_config"])
    assert not cfg.has_vision and cfg.vision is None and cfg.text.hidden_size == 4096


def test_head_dim_defaults_to_hidden_over_heads():
    d = official()
    del d["text_config"]["head_dim"]
    assert Step3VLConfig.from_dict(d).text.head_dim == 4096 // 32


def _mutate(path: str, value=None, delete: bool = False) -> dict:
    d = copy.deepcopy(official())
    *parents, leaf = path.split(".")
    node = d
    for p in parents:
        node = node[p]
    if delete:
        del node[leaf]
    else:
        node[leaf] = value
    return d


@pytest.mark.parametrize("path,match", [
    ("text_config.hidden_size", r"text_config\.hidden_size is missing"),
    ("text_config.vocab_size", r"text_config\.vocab_size is missing"),
    ("text_config.num_attention_heads", r"text_config\.num_attention_heads is missing"),
    ("vision_config.width", r"vision_config\.width is missing"),
    ("vision_config.patch_size", r"vision_config\.patch_size is missing"),
    ("vision_config.mlp_ratio", r"vision_config\.mlp_ratio is missing"),
    ("vision_config", r"config\.vision_config is missing"),
])
def test_missing_field_is_named(path, match):
    with pytest.raises(ConfigError, match=match):
        Step3VLConfig.from_dict(_mutate(path, delete=True))


@pytest.mark.parametrize("path,value,match", [
    ("text_config.hidden_size", "4096", r"text_config\.hidden_size = '4096'"),
    ("text_config.hidden_size", 0, r"text_config\.hidden_size must be > 0"),
    ("text_config.num_key_value_heads", 5, r"num_attention_heads 32 is not a multiple of num_key_value_heads 5"),
    ("text_config.hidden_act", "gelu", r"text_config\.hidden_act 'gelu'"),
    ("text_config.rope_scaling", {"rope_type": "yarn", "factor": 4.0}, r"rope type 'yarn'"),
    ("text_config.rope_scaling", {"type": "dynamic", "factor": 2.0}, r"rope type 'dynamic'"),
    ("text_config.rope_theta", -1.0, r"rope_theta = -1\.0 is invalid"),
    ("vision_config.width", 1536.5, r"vision_config\.width = 1536\.5"),
    ("vision_config.heads", 5, r"vision_config\.width 1536 not divisible by heads 5"),
    ("vision_config.heads", 256, r"head_dim 6 must be a multiple of 4"),
    ("vision_config.hidden_act", "relu", r"vision_config\.hidden_act 'relu'"),
    ("vision_config.use_ln_post", True, r"use_ln_post"),
    ("vision_config.ues_cls_token", True, r"ues_cls_token"),
    ("image_token_id", 151936, r"image_token_id 151936 outside vocab 151936"),
    ("understand_projector_stride", 4, r"understand_projector_stride 4"),
    ("text_config", "qwen3", r"config\.text_config = 'qwen3'"),
])
def test_invalid_field_is_named(path, value, match):
    with pytest.raises(ConfigError, match=match):
        Step3VLConfig.from_dict(_mutate(path, value))


def test_misspelled_cls_token_key_is_honoured():
    """The official key is `ues_cls_token`; it is read (a true value is refused, since the model has no CLS
    token), and a correctly spelled `use_cls_token` is read as well."""
    assert Step3VLConfig.from_dict(_mutate("vision_config.ues_cls_token", False)).vision.use_cls_token is False
    with pytest.raises(ConfigError, match="ues_cls_token"):
        Step3VLConfig.from_dict(_mutate("vision_config.ues_cls_token", True))
    d = _mutate("vision_config.ues_cls_token", delete=True)
    d["vision_config"]["use_cls_token"] = True
    with pytest.raises(ConfigError, match="cls_token"):
        Step3VLConfig.from_dict(d)


def test_vision_defaults_when_optional_keys_absent():
    d = official()
    for key in ("hidden_act", "rope_theta", "use_ln_pre", "ls_init_value", "ues_cls_token"):
        d["vision_config"].pop(key, None)
    v = Step3VLConfig.from_dict(d).vision
    assert (v.hidden_act, v.rope_theta, v.use_ln_pre, v.ls_init_value, v.use_cls_token) == \
        ("quick_gelu", 10000.0, True, 0.1, False)


def test_from_pretrained_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        Step3VLConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=str(tmp_path / "config.json")):
        Step3VLConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="top level"):
        Step3VLConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(official()))
    assert Step3VLConfig.from_pretrained(tmp_path).vision.layers == 47


def test_missing_text_config_is_named():
    with pytest.raises(ConfigError, match=r"text_config is missing"):
        Step3VLConfig.from_dict(_mutate("text_config", delete=True))


def test_bool_is_not_an_int():
    with pytest.raises(ConfigError, match=r"text_config\.hidden_size = True"):
        Step3VLConfig.from_dict(_mutate("text_config.hidden_size", True))

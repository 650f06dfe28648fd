"""Configuration dataclasses parsed from a checkpoint's config.json.

Two shapes of config.json are accepted: the official STEP3-VL one (`vision_config` + `text_config`) and a
plain Qwen3 one (`model_type` "qwen3"), which yields a text-only model (used by the decoder parity tests).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_MISSING = object()


class ConfigError(ValueError):
    """A config.json field is missing or invalid; the message names the field."""


def _get(d: dict, key: str, where: str, default: Any = _MISSING, kind: type | tuple = object) -> Any:
    value = d.get(key, default)
    if value is _MISSING:
        raise ConfigError(f"config.json: {where}.{key} is missing")
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:  # bool is an int subclass: `hidden_size: true` is wrong
        raise ConfigError(f"config.json: {where}.{key} = {value!r} should be {kind}")
    if value is not None and not isinstance(value, kind):
        raise ConfigError(f"config.json: {where}.{key} = {value!r} should be {kind}")
    return value


def _positive(value: int | float, name: str) -> None:
    if value <= 0:
        raise ConfigError(f"config.json: {name} must be > 0, got {value}")


@dataclass(slots=True)
class VisionConfig:
    width: int = 1536
    layers: int = 47
    heads: int = 16
    num_channels: int = 3
    image_size: int = 728
    patch_size: int = 14
    intermediate_size: int = 8960
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    use_cls_token: bool = False
    use_ln_pre: bool = True
    use_ln_post: bool = False
    use_abs_posemb: bool = True
    use_rope2d: bool = True
    ls_init_value: float | None = 0.1
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @classmethod
    def from_dict(cls, d: dict) -> "VisionConfig":
        w = "vision_config"
        num = (int, float)
        width = _get(d, "width", w, kind=int)
        if "intermediate_size" in d:
            intermediate = _get(d, "intermediate_size", w, kind=int)
        else:
            intermediate = round(width * _get(d, "mlp_ratio", w, kind=num))
        cfg = cls(
            width=width,
            layers=_get(d, "layers", w, kind=int),
            heads=_get(d, "heads", w, kind=int),
            num_channels=_get(d, "num_channels", w, 3, int),
            image_size=_get(d, "image_size", w, 728, int),
            patch_size=_get(d, "patch_size", w, kind=int),
            intermediate_size=intermediate,
            hidden_act=_get(d, "hidden_act", w, "quick_gelu", str),
            layer_norm_eps=float(_get(d, "layer_norm_eps", w, 1e-5, num)),
            # The official config misspells this key; honour both spellings.
            use_cls_token=bool(d.get("ues_cls_token", d.get("use_cls_token", False))),
            use_ln_pre=bool(_get(d, "use_ln_pre", w, True, bool)),
            use_ln_post=bool(_get(d, "use_ln_post", w, False, bool)),
            use_abs_posemb=bool(_get(d, "use_abs_posemb", w, True, bool)),
            use_rope2d=bool(_get(d, "use_rope2d", w, True, bool)),
            ls_init_value=_get(d, "ls_init_value", w, 0.1, num),
            rope_theta=float(_get(d, "rope_theta", w, 10000.0, num)),
        )
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for name in ("width", "layers", "heads", "patch_size", "image_size", "intermediate_size"):
            _positive(getattr(self, name), f"vision_config.{name}")
        if self.width % self.heads:
            raise ConfigError(f"config.json: vision_config.width {self.width} not divisible by heads {self.heads}")
        if self.use_cls_token:
            raise ConfigError("config.json: vision_config.ues_cls_token=true is not supported (STEP3-VL has no CLS)")
        if self.use_ln_post:
            raise ConfigError("config.json: vision_config.use_ln_post=true is not supported (STEP3-VL has no ln_post)")
        if self.use_rope2d and self.head_dim % 4:
            raise ConfigError(f"config.json: vision head_dim {self.head_dim} must be a multiple of 4 for 2D RoPE")
        if self.hidden_act not in ("quick_gelu", "gelu", "gelu_pytorch_tanh", "gelu_new"):
            raise ConfigError(f"config.json: vision_config.hidden_act {self.hidden_act!r} is not supported")


@dataclass(slots=True)
class TextConfig:
    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 12288
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    eos_token_id: list[int] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict, where: str = "text_config") -> "TextConfig":
        num = (int, float)
        hidden = _get(d, "hidden_size", where, kind=int)
        heads = _get(d, "num_attention_heads", where, kind=int)
        cfg = cls(
            vocab_size=_get(d, "vocab_size", where, kind=int),
            hidden_size=hidden,
            intermediate_size=_get(d, "intermediate_size", where, kind=int),
            num_hidden_layers=_get(d, "num_hidden_layers", where, kind=int),
            num_attention_heads=heads,
            num_key_value_heads=_get(d, "num_key_value_heads", where, heads, int),
            head_dim=_get(d, "head_dim", where, None, int) or hidden // heads,
            rms_norm_eps=float(_get(d, "rms_norm_eps", where, 1e-6, num)),
            rope_theta=_rope_theta(d, where),
            max_position_embeddings=_get(d, "max_position_embeddings", where, 40960, int),
            tie_word_embeddings=bool(_get(d, "tie_word_embeddings", where, False, bool)),
            hidden_act=_get(d, "hidden_act", where, "silu", str),
            eos_token_id=_as_list(d.get("eos_token_id")),
        )
        if d.get("use_sliding_window"):
            raise ConfigError(f"config.json: {where}.use_sliding_window=true is not supported (full attention only)")
        cfg.validate(where)
        return cfg

    def validate(self, where: str = "text_config") -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            _positive(getattr(self, name), f"{where}.{name}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"config.json: {where}.num_attention_heads {self.num_attention_heads} is not a "
                              f"multiple of num_key_value_heads {self.num_key_value_heads}")
        if self.hidden_act != "silu":
            raise ConfigError(f"config.json: {where}.hidden_act {self.hidden_act!r} is not supported (silu only)")


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _rope_theta(d: dict, where: str) -> float:
    # transformers 4.x writes rope_theta + rope_scaling; 5.x writes rope_parameters.
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    for p in (params, scaling):
        kind = p.get("rope_type", p.get("type", "default"))
        if kind != "default":
            raise ConfigError(f"config.json: {where} rope type {kind!r} is not supported (default RoPE only)")
    theta = params.get("rope_theta", d.get("rope_theta", 1_000_000.0))
    if not isinstance(theta, (int, float)) or theta <= 0:
        raise ConfigError(f"config.json: {where}.rope_theta = {theta!r} is invalid")
    return float(theta)


@dataclass(slots=True)
class Step3VLConfig:
    text: TextConfig
    vision: VisionConfig | None = None
    image_token_id: int = 151679
    projector_bias: bool = False
    projector_stride: int = 2
    model_type: str = "step_robotics"

    @property
    def has_vision(self) -> bool:
        return self.vision is not None

    @classmethod
    def from_dict(cls, d: dict) -> "Step3VLConfig":
        if not isinstance(d, dict):
            raise ConfigError("config.json: top level must be an object")
        model_type = d.get("model_type", "")
        if model_type == "qwen3" or ("text_config" not in d and "vision_config" not in d):
            return cls(text=TextConfig.from_dict(d, where="config"), model_type=model_type or "qwen3")
        text_d = _get(d, "text_config", "config", kind=dict)
        vision_d = _get(d, "vision_config", "config", kind=dict)
        cfg = cls(
            text=TextConfig.from_dict(text_d),
            vision=VisionConfig.from_dict(vision_d),
            image_token_id=_get(d, "image_token_id", "config", 151679, int),
            projector_bias=bool(_get(d, "projector_bias", "config", False, bool)),
            projector_stride=_get(d, "understand_projector_stride", "config", 2, int),
            model_type=model_type,
        )
        if not 0 <= cfg.image_token_id < cfg.text.vocab_size:
            raise ConfigError(f"config.json: image_token_id {cfg.image_token_id} outside vocab "
                              f"{cfg.text.vocab_size}")
        if cfg.projector_stride != 2:
            raise ConfigError(f"config.json: understand_projector_stride {cfg.projector_stride} unsupported (2)")
        return cfg

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "Step3VLConfig":
        file = Path(path) / "config.json"
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no config.json in the checkpoint directory")
        try:
            d = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file}: invalid JSON ({e})") from e
        return cls.from_dict(d)

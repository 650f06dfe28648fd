"""Text / chat messages + images → token ids and encoder views."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from step3vl.processor.chat import render_chat, split_images
from step3vl.processor.image import ImageError, ImageSpec, ImageViews, LazyImageViews, preprocess_image
from step3vl.processor.tokenizer import Step3VLTokenizer
from step3vl.processor.tokens import IMAGE_PLACEHOLDER, TokenLayout, image_token_ids


@dataclass
class ProcessedInput:
    input_ids: list[int]
    images: list[ImageViews] = field(default_factory=list)
    image_spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of each image's tokens
    image_positions: list[int] = field(default_factory=list)  # the `<im_patch>` slots inside those spans
    prompt: str = ""  # the text before placeholder expansion

    @property
    def num_image_tokens(self) -> int:
        return sum(e - s for s, e in self.image_spans)


class Step3VLProcessor:
    def __init__(self, tokenizer: Step3VLTokenizer, spec: ImageSpec = ImageSpec(), layout: TokenLayout | None = None):
        self.tokenizer = tokenizer
        self.spec = spec
        self.layout = layout or TokenLayout.from_geometry(spec)

    @classmethod
    def from_pretrained(cls, path: str | Path, max_image_pixels: int | None = None) -> "Step3VLProcessor":
        """Tokenizer files from `path`; patch size and projector stride from its config.json if present.
        max_image_pixels: the largest pixel buffer one image may need (ImageSpec.max_pixels; None: its default)."""
        path = Path(path)
        tokenizer = Step3VLTokenizer.from_pretrained(path)
        spec, layout = ImageSpec(), TokenLayout.from_geometry(ImageSpec())
        cfg_path = path / "config.json"
        if cfg_path.is_file():
            spec, layout = _geometry_from_config(cfg_path, tokenizer)
        if max_image_pixels is not None:
            if max_image_pixels < 0:
                raise ValueError(f"max_image_pixels = {max_image_pixels}: must be >= 0 (0: no limit)")
            spec = dataclasses.replace(spec, max_pixels=max_image_pixels)
        return cls(tokenizer, spec, layout)

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.image_token_id

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any
    ) -> tuple[str, list[Any]]:
        """Messages → (prompt text with one placeholder per image, the image sources in order)."""
        plain, images = split_images(messages)
        return self.render_split(plain, add_generation_prompt, **kwargs), images

    def render_split(self, plain: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """Render messages whose images `split_images` already took out (image parts are bare placeholders)."""
        kwargs.setdefault("eos_token", self.tokenizer.eos_token)
        kwargs.setdefault("bos_token", _special(self.tokenizer.config.get("bos_token")))
        return render_chat(plain, self.tokenizer.chat_template, add_generation_prompt, **kwargs)

    def __call__(
        self, text_or_messages: str | list[dict], images: Any = None, add_generation_prompt: bool = True
    ) -> ProcessedInput:
        if isinstance(text_or_messages, str):
            prompt, sources = text_or_messages, _as_list(images)
        else:
            prompt, sources = self.apply_chat_template(text_or_messages, add_generation_prompt)
            if images is not None:
                raise ValueError("pass images inside the messages' content parts, not as a separate argument")
        return self.process(prompt, sources)

    def process(self, prompt: str, images: list[Any], lazy: bool = False) -> ProcessedInput:
        """Prompt text with one placeholder per image → ids with each placeholder expanded.
        lazy: images as `LazyImageViews` (pixels preprocessed when first read; for training sets)."""
        pieces = prompt.split(IMAGE_PLACEHOLDER)
        if len(pieces) - 1 != len(images):
            raise ValueError(
                f"the prompt has {len(pieces) - 1} image placeholder(s) {IMAGE_PLACEHOLDER!r} "
                f"but {len(images)} image(s) were given"
            )
        make = LazyImageViews if lazy else preprocess_image
        views = [_view(make, i, img, self.spec) for i, img in enumerate(images)]
        ids = self.tokenizer.encode(pieces[0])
        spans = []
        for v, piece in zip(views, pieces[1:]):
            start = len(ids)
            ids += image_token_ids(v.grid, self.tokenizer.image_ids, self.layout)
            spans.append((start, len(ids)))
            ids += self.tokenizer.encode(piece)
        patch = self.tokenizer.image_ids.im_patch
        slots = [i for s, e in spans for i in range(s, e) if ids[i] == patch]
        return ProcessedInput(input_ids=ids, images=views, image_spans=spans, image_positions=slots, prompt=prompt)


def _view(make, index: int, image: Any, spec: ImageSpec):
    """Preprocess one image; an error says which of the prompt's images it was."""
    try:
        return make(image, spec)
    except ImageError as e:
        raise ImageError(f"image {index}: {e}") from None


def _as_list(images: Any) -> list[Any]:
    if images is None:
        return []
    return list(images) if isinstance(images, (list, tuple)) else [images]


def _special(tok: Any) -> str | None:
    return tok.get("content") if isinstance(tok, dict) else tok


def _geometry_from_config(cfg_path: Path, tokenizer: Step3VLTokenizer) -> tuple[ImageSpec, TokenLayout]:
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON in {cfg_path}: {e}") from None
    image_token_id = cfg.get("image_token_id")
    if image_token_id is not None and image_token_id != tokenizer.image_token_id:
        raise ValueError(
            f"{cfg_path}: image_token_id {image_token_id} differs from the tokenizer's "
            f"{IMAGE_PLACEHOLDER} id {tokenizer.image_token_id}"
        )
    vc = cfg.get("vision_config") or {}
    use_crops = vc.get("use_crops", True)
    if not isinstance(use_crops, bool):
        raise ValueError(f"{cfg_path}: vision_config.use_crops = {use_crops!r} should be true or false")
    spec = ImageSpec(global_size=int(vc.get("image_size", ImageSpec.global_size)), crops=use_crops)
    layout = TokenLayout.from_geometry(
        spec,
        patch_size=int(vc.get("patch_size", 14)),
        num_downsamplers=2,  # vit_downsampler1 and vit_downsampler2
        stride=int(cfg.get("understand_projector_stride", 2)),
    )
    return spec, layout

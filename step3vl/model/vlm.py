"""STEP3-VL: vision encoder + projector + Qwen3 decoder, with image features on the `<im_patch>` positions."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from step3vl.config import Step3VLConfig
from step3vl.model.attention import AttentionBackend
from step3vl.model.decoder import Qwen3Model
from step3vl.model.vision import VisionAttentionFn, VisionEncoder, sdpa_vision_attention


@dataclass(slots=True)
class ImagePixels:
    """The views of one image as the processor makes them: crops first in the token layout, then global."""

    global_view: torch.Tensor  # [3, S, S]
    crops: torch.Tensor  # [n, 3, s, s], n may be 0


class Step3VLForCausalLM(nn.Module):
    def __init__(self, cfg: Step3VLConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.vision is not None:
            self.vision_model = VisionEncoder(cfg.vision)
            self.vit_large_projector = nn.Linear(4 * cfg.vision.width, cfg.text.hidden_size, bias=cfg.projector_bias)
        self.model = Qwen3Model(cfg.text)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        if cfg.text.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def encode_views(self, pixels: torch.Tensor, attn_fn: VisionAttentionFn = sdpa_vision_attention) -> torch.Tensor:
        """[B, 3, S, S] equally sized views → [B, tokens, hidden] language-model embeddings."""
        if self.cfg.vision is None:
            raise ValueError("this checkpoint has no vision encoder (text-only config); it cannot take images")
        feats = self.vision_model(pixels.to(self.device), attn_fn)
        return self.vit_large_projector(feats)

    def encode_images(self, images: list[ImagePixels],
                      attn_fn: VisionAttentionFn = sdpa_vision_attention) -> list[torch.Tensor]:
        """Per image, [tokens, hidden] in token-layout order (crop features first, then the global view).

        All crops of all images run as one batch, all global views as another.
        """
        if not images:
            return []
        globals_ = self.encode_views(torch.stack([im.global_view for im in images]), attn_fn)
        crop_counts = [im.crops.shape[0] for im in images]
        crop_feats = None
        if sum(crop_counts):
            crop_feats = self.encode_views(torch.cat([im.crops for im in images if im.crops.shape[0]]), attn_fn)
        out, start = [], 0
        for i, n in enumerate(crop_counts):
            parts = [crop_feats[start:start + n].flatten(0, 1)] if n else []
            out.append(torch.cat(parts + [globals_[i]]))
            start += n
        return out

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None = None,
              image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with `image_features` [N, hidden] written over the N image positions: `image_mask`
        [T] bool when given (a generated `<im_patch>` id is then an ordinary token), else every `<im_patch>` id."""
        x = self.model.embed_tokens(input_ids)
        slots = input_ids == self.cfg.image_token_id if image_mask is None else image_mask.to(x.device)
        n = int(slots.sum())
        given = 0 if image_features is None else image_features.shape[0]
        if n != given:
            what = f"<im_patch> tokens (id {self.cfg.image_token_id})" if image_mask is None else "image positions"
            raise ValueError(f"prompt has {n} {what} but {given} image feature rows were given")
        if n:
            x = x.clone()
            x[slots] = image_features.to(x.dtype)
        return x

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attention: AttentionBackend,
                image_features: torch.Tensor | None = None, image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Packed tokens [T] at positions [T] → final hidden states [T, hidden] (call `compute_logits` next)."""
        return self.model(self.embed(input_ids, image_features, image_mask), positions, attention)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def reset_buffers(self) -> None:
        self.model.reset_buffers()

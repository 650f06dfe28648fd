"""Images in the engine: their identity in the prefix cache, and their features for a step's prefill chunks.

Identity: the block manager hashes token ids, and every image row carries the same `<im_patch>` id, so a prompt's
image rows are hashed as a value drawn from that image's pixels instead (`cache_token_ids`). Blocks before an
image are shared with any prompt that has the same text there; blocks from an image on only with prompts that have
the same image there (vLLM's multimodal hashes, in the token stream).

Features: a chunk needs the features of the images whose `<im_patch>` rows it covers, and only those. They come
from an LRU cache keyed by the image digest (vLLM's encoder cache), so an image is encoded once while it stays
cached however many requests, rounds or recomputations use it: the next PaCoRe round re-reads the tail rows of
its image that share a block with the changed text, and every problem about the same picture uses the same
features. The images a step still lacks, from every request in it, go through the vision encoder together
(crops of every image in one batch, global views in another), a bounded number of views per call.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch

from step3vl.engine.sequence import Request
from step3vl.model.vision import tokens_per_view
from step3vl.model.vlm import Step3VLForCausalLM


@dataclass
class RequestImages:
    """Where one request's images sit among its prompt's image rows, and their digests."""

    spans: list[tuple[int, int]]  # per image: its rows [lo, hi) in the order of the prompt's <im_patch> tokens
    rank: list[int]  # per prompt position p: image rows in positions [0, p]
    hashes: list[int]  # per image: image_hash

    def rows_before(self, position: int) -> int:
        return self.rank[position - 1] if position > 0 else 0

    def images_in(self, lo: int, hi: int) -> list[int]:
        return [i for i, (a, b) in enumerate(self.spans) if a < hi and lo < b]


class EncoderCache:
    """Image features by image digest, least recently used first out, within `capacity` bytes."""

    def __init__(self, capacity: int):
        self.capacity, self.used = capacity, 0
        self.entries: OrderedDict[int, torch.Tensor] = OrderedDict()

    def get(self, key: int) -> torch.Tensor | None:
        value = self.entries.get(key)
        if value is not None:
            self.entries.move_to_end(key)
        return value

    def put(self, key: int, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if key in self.entries or size > self.capacity:
            return
        while self.used + size > self.capacity:
            _, old = self.entries.popitem(last=False)
            self.used -= old.numel() * old.element_size()
        self.entries[key] = value
        self.used += size


def image_rows(model: Step3VLForCausalLM, image) -> int:
    """How many `<im_patch>` rows (and feature rows) one preprocessed image takes: crops first, then global."""
    patch = model.cfg.vision.patch_size
    crops = image.crops.shape[0] * tokens_per_view(image.crops.shape[-1], patch) if image.crops.shape[0] else 0
    return crops + tokens_per_view(image.global_view.shape[-1], patch)


def image_layout(model: Step3VLForCausalLM, prompt_token_ids: list[int], images: list,
                 hashes: list[int] | None = None) -> RequestImages:
    """The request's image layout; a prompt whose `<im_patch>` count differs from its images' rows is refused."""
    if model.cfg.vision is None:
        raise ValueError("this checkpoint has no vision encoder (text-only config); it cannot take images")
    spans, start = [], 0
    for im in images:
        n = image_rows(model, im)
        spans.append((start, start + n))
        start += n
    image_id = model.cfg.image_token_id
    rank = torch.cumsum(torch.tensor([t == image_id for t in prompt_token_ids], dtype=torch.int64), 0).tolist()
    found = rank[-1] if rank else 0
    if found != start:
        raise ValueError(f"the prompt has {found} <im_patch> tokens (id {image_id}) but its {len(images)} image(s) "
                         f"take {start} feature rows; build image prompts with the processor (LLM.prepare)")
    return RequestImages(spans, rank, hashes or [image_hash(im) for im in images])


def image_hash(image) -> int:
    """A 62-bit digest of one preprocessed image's pixels (every view)."""
    h = hashlib.blake2b(digest_size=8)
    for t in (image.global_view, image.crops):
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return int.from_bytes(h.digest(), "little") & (2**62 - 1)


def cache_token_ids(prompt_token_ids: list[int], layout: RequestImages) -> list[int]:
    """The prompt as the prefix cache sees it: image i's rows become -(1 + its digest), which no token id equals."""
    if not layout.hashes:
        return prompt_token_ids
    out, row, image = list(prompt_token_ids), 0, 0
    for p in range(len(out)):
        if layout.rank[p] > row:  # an image row
            while row >= layout.spans[image][1]:
                image += 1
            out[p] = -1 - layout.hashes[image]
            row += 1
    return out


class ImageInputs:
    """Per step: the image mask of the packed rows and the features to write over them."""

    def __init__(self, model: Step3VLForCausalLM, attn_fn: Callable, cache_bytes: int = 256 << 20,
                 max_views_per_call: int = 32):
        self.model, self.attn_fn, self.max_views_per_call = model, attn_fn, max_views_per_call
        self.cache = EncoderCache(cache_bytes)
        self.reset_counters()

    def reset_counters(self) -> None:
        self.images_encoded = self.encoder_calls = self.cache_hits = 0  # for stats and tests

    def gather(self, chunks: list[tuple[Request, int, int]]) -> tuple[list[bool], list[torch.Tensor]]:
        """chunks: (request, start, end) prompt positions of each prefill chunk, in packing order. Returns the
        mask over the chunks' rows and the features of their image rows, in order."""
        wanted: dict[int, object] = {}  # digest -> image, in first-use order
        for req, a, b in chunks:
            lay = req.image_layout
            if lay is not None:
                for i in lay.images_in(*self._rows(req, a, b)):
                    wanted.setdefault(lay.hashes[i], req.images[i])
        found = {h: self.cache.get(h) for h in wanted}
        self.cache_hits += sum(f is not None for f in found.values())
        self._encode([(h, im) for h, im in wanted.items() if found[h] is None], found)
        mask, features = [], []
        for req, a, b in chunks:
            mask += self._chunk(req, a, b, found, features)
        return mask, features

    @staticmethod
    def _rows(req: Request, a: int, b: int) -> tuple[int, int]:
        lay = req.image_layout
        return lay.rows_before(min(a, len(lay.rank))), lay.rows_before(min(b, len(lay.rank)))

    def _chunk(self, req: Request, a: int, b: int, found: dict, features: list[torch.Tensor]) -> list[bool]:
        lay = req.image_layout
        n_prompt = len(req.prompt_token_ids)
        if lay is None or a >= n_prompt:
            return [False] * (b - a)
        image_id = self.model.cfg.image_token_id
        mask = [p < n_prompt and req.prompt_token_ids[p] == image_id for p in range(a, b)]
        lo, hi = self._rows(req, a, b)
        for i in lay.images_in(lo, hi):
            s, e = lay.spans[i]
            features.append(found[lay.hashes[i]][max(lo, s) - s:min(hi, e) - s])
        return mask

    def _encode(self, missing: list[tuple[int, object]], found: dict) -> None:
        batch, views = [], 0
        for item in missing:
            n = 1 + item[1].crops.shape[0]
            if batch and views + n > self.max_views_per_call:
                self._encode_batch(batch, found)
                batch, views = [], 0
            batch.append(item)
            views += n
        if batch:
            self._encode_batch(batch, found)

    def _encode_batch(self, batch: list[tuple[int, object]], found: dict) -> None:
        with torch.inference_mode():
            feats = self.model.encode_images([im for _, im in batch], self.attn_fn)
        self.encoder_calls += 1
        self.images_encoded += len(batch)
        for (h, _), f in zip(batch, feats):
            found[h] = f
            self.cache.put(h, f)

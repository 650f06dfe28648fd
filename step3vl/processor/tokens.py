"""The image token layout (MODEL.md, "Token layout").

Per image: for each crop `<patch_start>` + crop_tokens×`<im_patch>` + `<patch_end>`, a `<patch_newline>`
after every crop row except the last, then `<im_start>` + global_tokens×`<im_patch>` + `<im_end>`.
Only the `<im_patch>` positions receive image features; the markers are ordinary text tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from step3vl.processor.image import ImageSpec, plan_image

IM_PATCH = "<im_patch>"
IM_START = "<im_start>"
IM_END = "<im_end>"
PATCH_START = "<patch_start>"
PATCH_END = "<patch_end>"
PATCH_NEWLINE = "<patch_newline>"
IMAGE_PLACEHOLDER = IM_PATCH  # one per image in the prompt text, expanded to the full layout


def features_per_side(pixels: int, patch_size: int, num_downsamplers: int = 2, stride: int = 2) -> int:
    """Side of the feature grid after the patch embed and the stride-`stride` k3/p1 convs."""
    if pixels % patch_size:
        raise ValueError(f"view size {pixels} is not a multiple of the patch size {patch_size}")
    n = pixels // patch_size
    for _ in range(num_downsamplers):
        n = (n - 1) // stride + 1  # Conv2d(k=3, s=stride, p=1) output size
    return n


@dataclass(frozen=True)
class TokenLayout:
    """How many `<im_patch>` tokens a crop and a global view take."""

    crop_tokens: int = 81  # 504/14 = 36 → 18 → 9; 9×9
    global_tokens: int = 169  # 728/14 = 52 → 26 → 13; 13×13

    @classmethod
    def from_geometry(
        cls, spec: ImageSpec = ImageSpec(), patch_size: int = 14, num_downsamplers: int = 2, stride: int = 2
    ) -> "TokenLayout":
        crop = features_per_side(spec.crop_size, patch_size, num_downsamplers, stride)
        glob = features_per_side(spec.global_size, patch_size, num_downsamplers, stride)
        return cls(crop_tokens=crop * crop, global_tokens=glob * glob)

    def count(self, grid: tuple[int, int]) -> int:
        rows, cols = grid
        return rows * cols * (self.crop_tokens + 2) + max(rows - 1, 0) + self.global_tokens + 2


@dataclass(frozen=True)
class ImageTokenIds:
    im_patch: int
    im_start: int
    im_end: int
    patch_start: int
    patch_end: int
    patch_newline: int

    @classmethod
    def from_vocab(cls, token_to_id) -> "ImageTokenIds":
        """`token_to_id(str) -> int` (raises on a missing token)."""
        return cls(
            im_patch=token_to_id(IM_PATCH),
            im_start=token_to_id(IM_START),
            im_end=token_to_id(IM_END),
            patch_start=token_to_id(PATCH_START),
            patch_end=token_to_id(PATCH_END),
            patch_newline=token_to_id(PATCH_NEWLINE),
        )


def _layout(grid: tuple[int, int], layout: TokenLayout, t: dict) -> list:
    rows, cols = grid
    out: list = []
    for r in range(rows):
        for _ in range(cols):
            out += [t["patch_start"]] + [t["im_patch"]] * layout.crop_tokens + [t["patch_end"]]
        if r < rows - 1:
            out.append(t["patch_newline"])
    out += [t["im_start"]] + [t["im_patch"]] * layout.global_tokens + [t["im_end"]]
    return out


def image_token_string(grid: tuple[int, int], layout: TokenLayout = TokenLayout()) -> str:
    names = dict(
        im_patch=IM_PATCH, im_start=IM_START, im_end=IM_END,
        patch_start=PATCH_START, patch_end=PATCH_END, patch_newline=PATCH_NEWLINE,
    )
    return "".join(_layout(grid, layout, names))


def image_token_ids(grid: tuple[int, int], ids: ImageTokenIds, layout: TokenLayout = TokenLayout()) -> list[int]:
    return _layout(grid, layout, vars(ids))


def num_image_tokens(
    width: int, height: int, spec: ImageSpec = ImageSpec(), layout: TokenLayout = TokenLayout()
) -> int:
    """Tokens one width×height image takes in the prompt (markers included)."""
    return layout.count(plan_image(width, height, spec).grid)

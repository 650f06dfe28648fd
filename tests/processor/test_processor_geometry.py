"""Crop plans and token counts against a hand-computed table (MODEL.md steps 1-4, token layout)."""

import pytest

from step3vl.processor import (
    ImageError,
    ImageSpec,
    ImageTokenIds,
    TokenLayout,
    image_token_ids,
    image_token_string,
    num_image_tokens,
    plan_image,
)
from step3vl.processor.tokens import features_per_side

# (w, h) → padded, scaled, window, canvas (w, h), grid (rows, cols), tokens.
# Worked by hand from MODEL.md; tokens = crops·83 + 171 + (rows − 1).
TABLE = [
    # 1280/504 = 2.54 → 3·504; 720/504 = 1.43 → 2·504; 6·83 + 171 + 1
    ((1280, 720), (1280, 720), (1280, 720), 504, (1512, 1008), (2, 3), 670),
    ((728, 728), (728, 728), (728, 728), 0, (728, 728), (0, 0), 171),
    # long ≤ 728, ratio 1.2 ≤ 1.5 → no crops
    ((600, 500), (600, 500), (600, 500), 0, (600, 500), (0, 0), 171),
    # ratio 20 → scaled 3024 × int(200·0.756) = 151; window = short side 151; 3024/151 = 20.03 → 20 crops
    ((4000, 200), (4000, 200), (3024, 151), 151, (3020, 151), (1, 20), 20 * 83 + 171),
    ((200, 4000), (200, 4000), (151, 3024), 151, (151, 3020), (20, 1), 20 * 83 + 171 + 19),
    # min side 20 < 32 and ratio 10 → square pad to 200, then no crops
    ((20, 200), (200, 200), (200, 200), 0, (200, 200), (0, 0), 171),
    ((200, 20), (200, 200), (200, 200), 0, (200, 200), (0, 0), 171),
    # ratio exactly 1/4 is not < 1/4 → no pad; long 124 ≤ 728, ratio 4 > 1.5 → window 31, 4 rows
    ((31, 124), (31, 124), (31, 124), 31, (31, 124), (4, 1), 4 * 83 + 171 + 3),
    ((31, 125), (125, 125), (125, 125), 0, (125, 125), (0, 0), 171),
    # scaled by 3024/4000 → 3024×2268; 2268/504 = 4.5 → 5 rows; 3024/504 = 6 cols
    ((4000, 3000), (4000, 3000), (3024, 2268), 504, (3024, 2520), (5, 6), 30 * 83 + 171 + 4),
    # long 800 > 728, ratio 1.6 ≤ 4 → window 504; width 500 < 504 stays; 800/504 = 1.59 → 1008
    ((500, 800), (500, 800), (500, 800), 504, (500, 1008), (2, 1), 2 * 83 + 171 + 1),
    # long 480 ≤ 728, ratio 1.6 > 1.5 → window = short side 300; 480/300 = 1.6 → 600
    ((300, 480), (300, 480), (300, 480), 300, (300, 600), (2, 1), 2 * 83 + 171 + 1),
    ((728, 485), (728, 485), (728, 485), 485, (970, 485), (1, 2), 2 * 83 + 171),
    # 1100/504 = 2.18: fractional part 0.18 ≤ 0.2 → rounds down to 2 windows; 600/504 = 1.19 → 1
    ((1100, 600), (1100, 600), (1100, 600), 504, (1008, 504), (1, 2), 2 * 83 + 171),
    # height 400 < 504 stays; one crop row
    ((1000, 400), (1000, 400), (1000, 400), 504, (1008, 400), (1, 2), 2 * 83 + 171),
    ((729, 729), (729, 729), (729, 729), 504, (1008, 1008), (2, 2), 4 * 83 + 171 + 1),
    # ratio 30 > 4, long 3000 ≤ 3024 → window 100, 30 columns
    ((3000, 100), (3000, 100), (3000, 100), 100, (3000, 100), (1, 30), 30 * 83 + 171),
    # pad to 3025², then scale to 3024² → 6×6 crops
    ((3025, 10), (3025, 3025), (3024, 3024), 504, (3024, 3024), (6, 6), 36 * 83 + 171 + 5),
    ((1, 1), (1, 1), (1, 1), 0, (1, 1), (0, 0), 171),
    # Official float arithmetic: 550/250 = 2.2, and 2.2 − 2 = 0.2000000000000002 > 0.2 → 3 columns.
    ((550, 250), (550, 250), (550, 250), 250, (750, 250), (1, 3), 3 * 83 + 171),
]


@pytest.mark.parametrize("size,padded,scaled,window,canvas,grid,tokens", TABLE)
def test_plan_table(size, padded, scaled, window, canvas, grid, tokens):
    plan = plan_image(*size)
    assert plan.padded == padded
    assert plan.scaled == scaled
    assert plan.window == window
    assert plan.canvas == canvas
    assert plan.grid == grid
    assert plan.num_crops == grid[0] * grid[1]
    assert num_image_tokens(*size) == tokens


def test_headline_counts():
    assert num_image_tokens(1280, 720) == 670
    assert num_image_tokens(728, 728) == 171


def test_crop_boxes_row_major_and_inside():
    plan = plan_image(1280, 720)
    w = plan.window
    expect = [(c * w, r * w, c * w + w, r * w + w) for r in range(2) for c in range(3)]
    assert list(plan.boxes) == expect


def test_single_crop_overhangs_short_side():
    # 1000×400: the rows of crops reach y=504 past the 400-px canvas (zero-filled by the cropper).
    plan = plan_image(1000, 400)
    assert plan.boxes == ((0, 0, 504, 504), (504, 0, 1008, 504))


def test_last_crop_shifted_inward():
    # Canvases are multiples of the window, so the shift only matters for other windows/steps;
    # exercise the helper directly: side 1100, window 504 → starts 0, 504, 596.
    from step3vl.processor.image import _starts

    assert _starts(1100, 504) == [0, 504, 596]
    assert _starts(1008, 504) == [0, 504]
    assert _starts(400, 504) == [0]


def test_zero_size_rejected():
    with pytest.raises(ImageError, match="zero-sized"):
        plan_image(0, 10)


def test_layout_from_geometry():
    layout = TokenLayout.from_geometry(ImageSpec(), patch_size=14)
    assert (layout.crop_tokens, layout.global_tokens) == (81, 169)  # 36→18→9, 52→26→13
    assert features_per_side(504, 14) == 9 and features_per_side(728, 14) == 13
    # a k3/s2/p1 conv rounds odd sides up: 504/28 = 18 → 9 → 5; 728/28 = 26 → 13 → 7
    layout28 = TokenLayout.from_geometry(ImageSpec(), patch_size=28)
    assert (layout28.crop_tokens, layout28.global_tokens) == (25, 49)
    with pytest.raises(ValueError, match="not a multiple"):
        features_per_side(728, 15)


def test_token_string_structure():
    s = image_token_string((2, 3))
    crop = "<patch_start>" + "<im_patch>" * 81 + "<patch_end>"
    glob = "<im_start>" + "<im_patch>" * 169 + "<im_end>"
    assert s == crop * 3 + "<patch_newline>" + crop * 3 + glob
    assert image_token_string((0, 0)) == glob
    assert image_token_string((3, 1)) == crop + "<patch_newline>" + crop + "<patch_newline>" + crop + glob


def test_token_ids_match_string():
    ids = ImageTokenIds(im_patch=1, im_start=2, im_end=3, patch_start=4, patch_end=5, patch_newline=6)
    names = {1: "<im_patch>", 2: "<im_start>", 3: "<im_end>", 4: "<patch_start>", 5: "<patch_end>", 6: "<patch_newline>"}
    for grid in [(0, 0), (1, 2), (2, 3), (20, 1)]:
        seq = image_token_ids(grid, ids)
        assert "".join(names[i] for i in seq) == image_token_string(grid)
        assert len(seq) == TokenLayout().count(grid)
        assert seq.count(1) == grid[0] * grid[1] * 81 + 169

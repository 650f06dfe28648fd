"""The `shapes` task (step3vl/tasks/shapes.py) against its specification (shared/SHAPES.md).

Every expectation here comes from the specification or from the rendered pixels, never from the module's own
outputs: the pictures are analysed with numpy alone (connected components of non-background pixels, the fill
colour of each, its pixel area, its kind from its geometry), the canonical answer is recomputed from those
facts plus the parameters parsed out of the question's text, and compared with `problem.answer`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from step3vl.tasks import shapes as S
from step3vl.tasks.shapes import Shape, ShapesProblem, final_answer, generate, is_correct, shapes_reward

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "step3vl" / "assets"

# -- the specification's facts, written out here (not imported from the module under test) ---------------

SPEC_COLOURS = {
    "red": (220, 50, 50), "green": (40, 170, 70), "blue": (50, 110, 220),
    "yellow": (240, 200, 40), "purple": (150, 80, 200), "orange": (245, 140, 30),
}
SPEC_KINDS = ("circle", "square", "rectangle", "triangle")
Q7 = ("How many shapes are in the picture? Count the circles among them, name the colour of the largest "
      "shape, and give the final answer as: shapes, circles, colour.")
_C = "|".join(SPEC_COLOURS)
_K = "|".join(SPEC_KINDS)
QUESTION_PATTERNS = {
    1: re.compile(r"How many shapes are in the picture\?"),
    2: re.compile(rf"How many (?P<colour>{_C}) shapes are there\?"),
    3: re.compile(rf"How many (?P<kind>{_K})s are there\?"),
    4: re.compile(r"What colour is the largest shape\?"),
    5: re.compile(r"What kind of shape is the largest one\?"),
    6: re.compile(rf"How many more (?P<kind1>{_K})s than (?P<kind2>{_K})s are there\?"),
    7: re.compile(re.escape(Q7)),
}
LARGEST_TEMPLATES = (4, 5, 7)


# -- independent picture analysis -------------------------------------------------------------------------


def label_components(fg: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a boolean mask (run-length union-find; PIL's wide outlines can leave a vertex
    pixel touching its shape only diagonally, and shapes are >= 8 px apart, so 8-connectivity never merges two)."""
    h, w = fg.shape
    parent: list[int] = []

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    padded = np.zeros((h, w + 2), np.int8)
    padded[:, 1:-1] = fg
    edges = np.diff(padded, axis=1)
    runs, prev = [], []
    for y in range(h):
        cur = []
        for s, e in zip(np.flatnonzero(edges[y] == 1).tolist(), np.flatnonzero(edges[y] == -1).tolist()):
            rid = len(parent)
            parent.append(rid)
            for ps, pe, pid in prev:
                if ps <= e and s <= pe:  # runs [s, e) and [ps, pe) touch, diagonals included
                    a, b = find(rid), find(pid)
                    if a != b:
                        parent[max(a, b)] = min(a, b)
            cur.append((s, e, rid))
            runs.append((y, s, e, rid))
        prev = cur
    labels, roots = np.zeros((h, w), np.int32), {}
    for y, s, e, rid in runs:
        labels[y, s:e] = roots.setdefault(find(rid), len(roots) + 1)
    return labels, len(roots)


@dataclasses.dataclass
class Blob:
    """One shape as the pixels show it."""
    ys: np.ndarray
    xs: np.ndarray
    area: int  # mask pixels, outline included
    fill: np.ndarray  # (k, 3) the non-black pixels
    rgb: tuple[int, int, int]  # the median fill pixel
    colour: str  # the nearest named colour
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 inclusive
    kind: str  # from the geometry alone
    bbox_fill: float
    aspect: float

    @property
    def centre(self) -> tuple[float, float]:
        return (self.bbox[0] + self.bbox[2]) / 2, (self.bbox[1] + self.bbox[3]) / 2


def nearest_colour(rgb) -> str:
    return min(SPEC_COLOURS, key=lambda c: sum((a - b) ** 2 for a, b in zip(rgb, SPEC_COLOURS[c])))


def geometric_kind(bbox_fill: float, aspect: float) -> str:
    """A square/rectangle fills its (axis-aligned) bounding box, a circle ~pi/4 of it, a triangle at most half."""
    if bbox_fill >= 0.95:
        return "square" if aspect < 1.2 else "rectangle" if aspect >= 1.4 else "?"
    if 0.70 <= bbox_fill <= 0.85 and aspect < 1.1:
        return "circle"
    if bbox_fill <= 0.6:
        return "triangle"
    return "?"


@dataclasses.dataclass
class Analysis:
    size: tuple[int, int]
    background: tuple[int, int, int]
    blobs: list[Blob]
    black: np.ndarray  # (h, w) bool


def analyse(img: Image.Image) -> Analysis:
    a = np.asarray(img.convert("RGB")).astype(np.int32)
    h, w, _ = a.shape
    packed = (a[..., 0] << 16) | (a[..., 1] << 8) | a[..., 2]
    values, counts = np.unique(packed, return_counts=True)
    bgv = int(values[np.argmax(counts)])  # every shape is <= 12% of the picture: the commonest colour is the background
    background = (bgv >> 16, (bgv >> 8) & 255, bgv & 255)
    labels, n = label_components(packed != bgv)
    black = packed == 0
    blobs = []
    for i in range(1, n + 1):
        ys, xs = np.nonzero(labels == i)
        px = a[ys, xs]
        fill = px[~black[ys, xs]]
        rgb = tuple(int(v) for v in np.median(fill, axis=0)) if len(fill) else (0, 0, 0)
        x0, x1, y0, y1 = int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())
        bw, bh = x1 - x0 + 1, y1 - y0 + 1
        bbox_fill, aspect = len(xs) / (bw * bh), max(bw, bh) / min(bw, bh)
        blobs.append(Blob(ys, xs, len(xs), fill, rgb, nearest_colour(rgb), (x0, y0, x1, y1),
                          geometric_kind(bbox_fill, aspect), bbox_fill, aspect))
    return Analysis((w, h), background, blobs, black)


def parse_question(question: str) -> tuple[int, dict]:
    hits = [(t, m) for t, p in QUESTION_PATTERNS.items() if (m := p.fullmatch(question))]
    assert len(hits) == 1, f"question matches no single template of the spec: {question!r}"
    t, m = hits[0]
    return t, m.groupdict()


def spec_answer(template: int, params: dict, facts: list[tuple[str, str, float]]) -> str:
    """The canonical answer by SHAPES.md, from (colour, kind, area) of every shape."""
    n = len(facts)
    count_kind = lambda k: sum(f[1] == k for f in facts)  # noqa: E731
    largest = max(facts, key=lambda f: f[2]) if facts else None
    if template == 1:
        return str(n)
    if template == 2:
        return str(sum(f[0] == params["colour"] for f in facts))
    if template == 3:
        return str(count_kind(params["kind"]))
    if template == 4:
        return largest[0]
    if template == 5:
        return largest[1]
    if template == 6:
        return str(count_kind(params["kind1"]) - count_kind(params["kind2"]))
    return f"{n}, {count_kind('circle')}, {largest[0]}"


def match_shapes(problem: ShapesProblem, an: Analysis) -> list[tuple[Shape, Blob]]:
    """Pair each declared shape with the blob whose pixel bounding box holds its analytic bbox centre."""
    pairs = []
    for s in problem.shapes:
        x0, y0, x1, y1 = s.bbox
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        hits = [b for b in an.blobs if b.bbox[0] <= cx <= b.bbox[2] and b.bbox[1] <= cy <= b.bbox[3]]
        assert len(hits) == 1, f"seed {problem.seed}: shape {s} has {len(hits)} blobs at its centre"
        pairs.append((s, hits[0]))
    assert len({id(b) for _, b in pairs}) == len(pairs)
    return pairs


@functools.lru_cache(maxsize=None)
def problem_and_analysis(seed: int) -> tuple[ShapesProblem, Analysis]:
    p = generate(seed)
    return p, analyse(p.image())


ANSWER_SEEDS = list(range(0, 500, 8)) + [S.TRAIN_SEED_START + 7919 * k for k in range(7)]  # 63 held-out + 7
SPEC_SEEDS = list(range(0, 140)) + [S.TRAIN_SEED_START + 104_729 * k for k in range(60)]  # 200


def test_seed_lists_cover_every_template():
    assert {s % 7 + 1 for s in ANSWER_SEEDS} == set(range(1, 8))
    assert min(sum(s % 7 + 1 == t for s in ANSWER_SEEDS) for t in range(1, 8)) >= 8
    assert {s % 7 + 1 for s in SPEC_SEEDS} == set(range(1, 8))


# -- 1. the answers are right, recomputed from the pixels ------------------------------------------------


def test_analysis_of_a_hand_drawn_picture():
    """The analyser itself, on a picture whose facts are known by construction."""
    p = hand_problem(1)
    an = analyse(p.image())
    assert an.background == (248, 246, 240)
    got = sorted((b.colour, b.kind) for b in an.blobs)
    assert got == sorted([("red", "circle"), ("red", "circle"), ("blue", "square"), ("purple", "rectangle")])
    purple = next(b for b in an.blobs if b.colour == "purple")
    assert purple.area == max(b.area for b in an.blobs)
    assert abs(purple.area - 110 * 55) <= 2 * (110 + 55)  # a filled rectangle of 110 x 55 (edges inclusive)


def test_answers_match_the_picture():
    failures = []
    for seed in ANSWER_SEEDS:
        p, an = problem_and_analysis(seed)
        template, params = parse_question(p.question)
        if template != seed % 7 + 1:
            failures.append(f"seed {seed}: question is template {template}, the spec says {seed % 7 + 1}")
        if p.template != template:
            failures.append(f"seed {seed}: problem.template {p.template} but question is template {template}")
        for b in an.blobs:
            if b.kind == "?":
                failures.append(f"seed {seed}: blob at {b.bbox} is no recognisable kind "
                                f"(fill {b.bbox_fill:.3f}, aspect {b.aspect:.2f})")
        if len(an.blobs) != len(p.shapes):
            failures.append(f"seed {seed}: {len(an.blobs)} shapes in the picture, {len(p.shapes)} declared")
            continue
        for s, b in match_shapes(p, an):  # the declared shapes are the drawn ones
            if (s.kind, s.colour) != (b.kind, b.colour):
                failures.append(f"seed {seed}: declared {s.colour} {s.kind}, drawn {b.colour} {b.kind}")
        facts = [(b.colour, b.kind, b.area) for b in an.blobs]
        expected = spec_answer(template, params, facts)
        if p.answer != expected:
            failures.append(f"seed {seed}: answer {p.answer!r}, the picture says {expected!r} ({p.question})")
        # the largest by filled pixels (outline excluded) is the same shape as with the outline
        if template in LARGEST_TEMPLATES:
            by_fill = max(an.blobs, key=lambda b: len(b.fill))
            by_mask = max(an.blobs, key=lambda b: b.area)
            if by_fill is not by_mask:
                failures.append(f"seed {seed}: largest shape depends on whether the outline counts")
    assert not failures, "\n".join(failures)


# -- 2. the picture constraints of SHAPES.md --------------------------------------------------------------


def _spec_check(check) -> None:
    failures = []
    for seed in SPEC_SEEDS:
        p, an = problem_and_analysis(seed)
        failures += [f"seed {seed}: {msg}" for msg in check(p, an)]
    assert not failures, "\n".join(failures[:40])


def test_picture_size_and_background():
    def check(p, an):
        w, h = an.size
        if not (224 <= w <= 512 and 224 <= h <= 512):
            yield f"picture {w}x{h}"
        if (w, h) != tuple(p.size):
            yield f"picture {w}x{h} but problem.size {p.size}"
        if not all(235 <= c <= 255 for c in an.background):
            yield f"background {an.background}"
    _spec_check(check)


def test_shape_count_and_declared_shapes():
    def check(p, an):
        if not 1 <= len(an.blobs) <= 7:
            yield f"{len(an.blobs)} shapes drawn"
        if len(an.blobs) != len(p.shapes):
            yield f"{len(an.blobs)} shapes drawn, {len(p.shapes)} declared"
        for s in p.shapes:
            if s.kind not in SPEC_KINDS or s.colour not in SPEC_COLOURS:
                yield f"declared {s.colour} {s.kind}"
    _spec_check(check)


def _min_distance(a: Blob, b: Blob, reach: int = 8) -> float:
    """The least distance between pixel centres of two blobs, exact up to `reach` (larger distances are
    reported as > reach)."""
    def near(blob, box):
        keep = ((blob.xs >= box[0] - reach) & (blob.xs <= box[2] + reach)
                & (blob.ys >= box[1] - reach) & (blob.ys <= box[3] + reach))
        return np.stack([blob.xs[keep], blob.ys[keep]], 1).astype(float)
    pa, pb = near(a, b.bbox), near(b, a.bbox)
    if len(pa) == 0 or len(pb) == 0:
        return reach + 1.0
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1)).min()
    return float(d)


def test_shapes_are_apart_and_wholly_inside():
    def check(p, an):
        w, h = an.size
        for i, a in enumerate(an.blobs):
            x0, y0, x1, y1 = a.bbox
            if x0 == 0 or y0 == 0 or x1 == w - 1 or y1 == h - 1:
                yield f"shape at {a.bbox} touches the picture's edge (may be cut)"
            for b in an.blobs[i + 1:]:
                d = _min_distance(a, b)
                if d < 9:  # 8 background pixels between them at least
                    yield f"shapes at {a.bbox} and {b.bbox} are {d - 1:.1f} px apart"
        for s in p.shapes:
            bx0, by0, bx1, by1 = s.bbox
            if bx0 < 0 or by0 < 0 or bx1 > w - 1 or by1 > h - 1:
                yield f"declared shape {s.kind} bbox {s.bbox} leaves the {w}x{h} picture"
        if len(an.blobs) == len(p.shapes):
            for s, b in match_shapes(p, an):  # not clipped: the drawn area is the analytic area
                perim = _perimeter(s)
                if not -perim / 2 <= b.area - s.area <= perim:
                    yield f"{s.kind} drawn with {b.area} px, analytic {s.area:.0f}"
    _spec_check(check)


def _pixel_perimeter(b: Blob) -> int:
    """A blob's boundary length in pixels: its pixels with a 4-neighbour outside it."""
    mask = np.zeros((int(b.ys.max()) + 3, int(b.xs.max()) + 3), dtype=bool)
    mask[b.ys + 1, b.xs + 1] = True
    inner = mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
    return int(mask[1:-1, 1:-1].sum() - inner.sum())


def _perimeter(s: Shape) -> float:
    if s.kind == "circle":
        return 2 * math.pi * s.points[1][0]
    pts = s.points
    return sum(math.dist(pts[i], pts[(i + 1) % len(pts)]) for i in range(len(pts)))


def test_shape_areas():
    def check(p, an):
        pic = an.size[0] * an.size[1]
        for s in p.shapes:
            if not 0.015 <= s.area / pic <= 0.12:
                yield f"{s.kind} analytic area {s.area / pic:.4f} of the picture"
        for b in an.blobs:
            if not 0.015 * 0.97 <= b.area / pic <= 0.12 * 1.03:  # rasterisation tolerance
                yield f"shape at {b.bbox} has {b.area} px = {b.area / pic:.4f} of the picture"
    _spec_check(check)


def _side_lengths(s: Shape) -> list[float]:
    return [math.dist(s.points[i], s.points[(i + 1) % len(s.points)]) for i in range(len(s.points))]


def _angles(pts) -> list[float]:
    out = []
    for i in range(3):
        a, b, c = pts[i], pts[(i + 1) % 3], pts[(i + 2) % 3]
        v1, v2 = (b[0] - a[0], b[1] - a[1]), (c[0] - a[0], c[1] - a[1])
        cos = (v1[0] * v2[0] + v1[1] * v2[1]) / (math.hypot(*v1) * math.hypot(*v2))
        out.append(math.degrees(math.acos(max(-1.0, min(1.0, cos)))))
    return out


def test_kind_geometry():
    def check(p, an):
        for s in p.shapes:
            if s.kind in ("square", "rectangle"):
                if len(s.points) != 4:
                    yield f"{s.kind} with {len(s.points)} vertices"
                    continue
                sides = _side_lengths(s)
                a, b = sides[0], sides[1]
                if abs(sides[0] - sides[2]) > 1e-6 * a or abs(sides[1] - sides[3]) > 1e-6 * b:
                    yield f"{s.kind} with sides {sides}"
                diag1, diag2 = math.dist(s.points[0], s.points[2]), math.dist(s.points[1], s.points[3])
                if abs(diag1 - diag2) > 1e-6 * diag1:
                    yield f"{s.kind} without right angles"
                ratio = max(a, b) / min(a, b)
                if s.kind == "rectangle" and ratio < 1.5:
                    yield f"rectangle with sides {a:.1f} x {b:.1f} ({ratio:.3f}x)"
                if s.kind == "square" and ratio > 1 + 1e-6:
                    yield f"square with sides {a:.1f} x {b:.1f}"
            elif s.kind == "triangle":
                if len(s.points) != 3:
                    yield f"triangle with {len(s.points)} vertices"
                    continue
                angles = _angles(s.points)
                if min(angles) < 25 - 1e-9 or abs(sum(angles) - 180) > 1e-6:
                    yield f"triangle with angles {[round(x, 2) for x in angles]}"
            elif s.kind == "circle":
                (_, _), (r1, r2) = s.points
                if r1 != r2 or r1 <= 0:
                    yield f"circle with radii {r1}, {r2}"
        if len(an.blobs) == len(p.shapes):
            for s, b in match_shapes(p, an):
                if s.kind == "rectangle" and b.aspect < 1.45:
                    yield f"rectangle drawn {b.bbox} ({b.aspect:.3f}x)"
                if s.kind == "square" and b.aspect > 1.05:
                    yield f"square drawn {b.bbox} ({b.aspect:.3f}x)"
    _spec_check(check)


def test_colours_are_flat_and_within_jitter():
    def check(p, an):
        for b in an.blobs:
            if not (b.fill == b.fill[0]).all():
                yield f"shape at {b.bbox} is not filled with one flat colour"
            ref = SPEC_COLOURS[b.colour]
            if any(abs(x - r) > 12 for x, r in zip(b.rgb, ref)):
                yield f"{b.colour} shape drawn {b.rgb}, named {ref}"
        for s in p.shapes:
            ref = SPEC_COLOURS[s.colour]
            if any(abs(x - r) > 12 for x, r in zip(s.rgb, ref)):
                yield f"declared {s.colour} with rgb {s.rgb}"
    _spec_check(check)


def _edge_runs(black: np.ndarray, b: Blob) -> set[int]:
    """Lengths of the black runs met walking inwards from the four extreme points of a blob."""
    x0, y0, x1, y1 = b.bbox
    r, c = (y0 + y1) // 2, (x0 + x1) // 2

    def run(line):
        k = 0
        while k < len(line) and line[k]:
            k += 1
        return k
    return {run(black[r, x0:x1 + 1]), run(black[r, x0:x1 + 1][::-1]),
            run(black[y0:y1 + 1, c]), run(black[y0:y1 + 1, c][::-1])}


def _ring_ratio(black: np.ndarray, b: Blob, s: Shape) -> float:
    """A circle's black pixels over the area of a ring `s.outline` wide inside its drawn edge."""
    r = s.points[1][0] + 0.5  # PIL's ellipse includes its bounding box's last pixels
    return int(black[b.ys, b.xs].sum()) / (math.pi * (r * r - (r - s.outline) ** 2))


def _edge_thickness(black: np.ndarray, s: Shape) -> list[float]:
    """The mean perpendicular thickness of the black stroke along the middle half of each edge of a polygon:
    black pixels within 5 px of the edge line there, per unit of edge length."""
    pts = [np.array(q, float) for q in s.points]
    x0, y0, x1, y1 = (int(v) for v in s.bbox)
    top, left = max(0, y0 - 5), max(0, x0 - 5)
    ys, xs = np.nonzero(black[top:y1 + 6, left:x1 + 6])
    xy = np.stack([xs + left, ys + top], 1).astype(float)
    out = []
    for i in range(len(pts)):
        a, b = pts[i], pts[(i + 1) % len(pts)]
        d = b - a
        length = float(np.hypot(*d))
        t = (xy - a) @ d / length
        dist = (xy - a) @ np.array([-d[1], d[0]]) / length
        keep = (t > 0.25 * length) & (t < 0.75 * length) & (np.abs(dist) < 5)
        out.append(int(keep.sum()) / (0.5 * length))
    return out


def test_outlines_are_black_2_to_3_px():
    """Squares, rectangles and circles: the stroke at each extreme point is the declared 2 or 3 px; a circle's
    black ring has the area of a ring that wide."""
    def check(p, an):
        if len(an.blobs) != len(p.shapes):
            return
        for s, b in match_shapes(p, an):
            if s.outline not in (2, 3):
                yield f"declared outline {s.outline}"
            if b.kind in ("circle", "square", "rectangle") and _edge_runs(an.black, b) != {s.outline}:
                yield f"{s.kind} outline drawn {_edge_runs(an.black, b)} px, declared {s.outline}"
            if s.kind == "circle" and not 0.85 <= _ring_ratio(an.black, b, s) <= 1.1:
                yield f"circle ring {_ring_ratio(an.black, b, s):.2f}x a {s.outline} px ring"
            if s.kind in ("square", "rectangle"):
                th = _edge_thickness(an.black, s)
                if not all(1.75 <= x <= 3.5 for x in th):
                    yield f"{s.kind} edges {[round(x, 2) for x in th]} px thick"
    _spec_check(check)


def test_triangle_outlines_are_2_to_3_px():
    """Every triangle edge carries the declared 2-3 px black stroke (within rasterisation: +-0.75 px)."""
    def check(p, an):
        for s in p.shapes:
            if s.kind == "triangle":
                th = _edge_thickness(an.black, s)
                if not all(s.outline - 0.75 <= x <= s.outline + 0.75 for x in th):
                    yield f"triangle (outline {s.outline}) edges {[round(x, 2) for x in th]} px thick"
    _spec_check(check)


def test_largest_shape_is_unique_for_largest_questions():
    def check(p, an):
        if p.template not in LARGEST_TEMPLATES or len(p.shapes) == 1:
            return
        areas = sorted((s.area for s in p.shapes), reverse=True)
        if areas[0] < 1.10 * areas[1]:
            yield f"analytic largest {areas[0]:.0f} vs {areas[1]:.0f} ({areas[0] / areas[1]:.3f}x)"
        px = sorted((b.area for b in an.blobs), reverse=True)
        if len(px) > 1 and px[0] < 1.07 * px[1]:  # 1.10x analytically, a little less after rasterisation
            yield f"pixel largest {px[0]} vs {px[1]} ({px[0] / px[1]:.3f}x)"
        if len(an.blobs) == len(p.shapes):
            analytic_largest = max(p.shapes, key=lambda s: s.area)
            drawn = dict((id(s), b) for s, b in match_shapes(p, an))[id(analytic_largest)]
            if drawn.area != max(b.area for b in an.blobs):
                yield "the analytically largest shape is not the largest drawn"
    _spec_check(check)


def test_largest_templates_occur_with_several_shapes():
    """The uniqueness rule is exercised: most largest-shape problems have a runner-up."""
    multi = [s for s in SPEC_SEEDS if s % 7 + 1 in LARGEST_TEMPLATES and len(problem_and_analysis(s)[0].shapes) > 1]
    assert len(multi) >= 40


# -- 3. determinism --------------------------------------------------------------------------------------


def _png(p: ShapesProblem) -> bytes:
    buf = io.BytesIO()
    p.image().save(buf, format="PNG")
    return buf.getvalue()


DET_SEEDS = [0, 1, 2, 3, 4, 5, 6, 499, S.TRAIN_SEED_START, S.TRAIN_SEED_START + 123_457]


def test_same_seed_same_problem_and_png():
    for seed in DET_SEEDS:
        a, b = generate(seed), generate(seed)
        assert a == b
        assert (a.question, a.answer, a.description(), a.reasoning()) == (b.question, b.answer, b.description(),
                                                                           b.reasoning())
        assert _png(a) == _png(b)


def test_same_seed_same_problem_in_another_process():
    """Across processes with a different hash seed too (no hash() in the generator)."""
    code = ("import hashlib, io, json, sys\n"
            "from step3vl.tasks.shapes import generate\n"
            "out = []\n"
            "for s in json.loads(sys.argv[1]):\n"
            "    p = generate(s); b = io.BytesIO(); p.image().save(b, format='PNG')\n"
            "    out.append([repr(p), p.answer, hashlib.sha256(b.getvalue()).hexdigest()])\n"
            "print(json.dumps(out))\n")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    res = subprocess.run([sys.executable, "-c", code, json.dumps(DET_SEEDS)], capture_output=True, text=True,
                         env=env, timeout=60, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    theirs = json.loads(res.stdout)
    ours = [[repr(p), p.answer, hashlib.sha256(_png(p)).hexdigest()] for p in map(generate, DET_SEEDS)]
    assert theirs == ours


def test_different_seeds_differ():
    seeds = list(range(0, 40)) + [S.TRAIN_SEED_START + k for k in range(10)]
    problems = [generate(s) for s in seeds]
    pngs = {hashlib.sha256(_png(p)).digest() for p in problems}
    assert len(pngs) == len(seeds)
    pictures = {(p.size, p.background, p.shapes) for p in problems}
    assert len(pictures) == len(seeds)
    assert len({p.id for p in problems}) == len(seeds)
    assert {p.seed for p in problems} == set(seeds)


# -- 4. hand-made problems -------------------------------------------------------------------------------


def _circle(colour, cx, cy, r):
    return Shape("circle", colour, SPEC_COLOURS[colour], ((cx, cy), (r, r)), 2)


def _box(kind, colour, x0, y0, x1, y1):
    return Shape(kind, colour, SPEC_COLOURS[colour], ((x0, y0), (x1, y0), (x1, y1), (x0, y1)), 3)


HAND_SHAPES = (
    # the circle's bounding box (80 x 80 = 6400) is larger than the rectangle's (110 x 55 = 6050), its area
    # (5027) is not: "largest" is by filled area
    _circle("red", 60, 60, 40),
    _circle("red", 60, 220, 25),
    _box("square", "blue", 170, 20, 240, 90),  # 4900
    _box("rectangle", "purple", 260, 150, 370, 205),  # 6050, the largest (1.20x the big circle)
)


def hand_problem(template: int, **params) -> ShapesProblem:
    return ShapesProblem(seed=-1, size=(400, 300), background=(248, 246, 240), shapes=HAND_SHAPES,
                         template=template, params=tuple(params.items()))


@pytest.mark.parametrize("template, params, question, answer", [
    (1, {}, "How many shapes are in the picture?", "4"),
    (2, {"colour": "red"}, "How many red shapes are there?", "2"),
    (2, {"colour": "purple"}, "How many purple shapes are there?", "1"),
    (2, {"colour": "green"}, "How many green shapes are there?", "0"),
    (3, {"kind": "circle"}, "How many circles are there?", "2"),
    (3, {"kind": "square"}, "How many squares are there?", "1"),
    (3, {"kind": "rectangle"}, "How many rectangles are there?", "1"),
    (3, {"kind": "triangle"}, "How many triangles are there?", "0"),
    (4, {}, "What colour is the largest shape?", "purple"),
    (5, {}, "What kind of shape is the largest one?", "rectangle"),
    (6, {"kind1": "circle", "kind2": "square"}, "How many more circles than squares are there?", "1"),
    (6, {"kind1": "square", "kind2": "circle"}, "How many more squares than circles are there?", "-1"),
    (6, {"kind1": "triangle", "kind2": "circle"}, "How many more triangles than circles are there?", "-2"),
    (6, {"kind1": "rectangle", "kind2": "triangle"}, "How many more rectangles than triangles are there?", "1"),
    (7, {}, Q7, "4, 2, purple"),
])
def test_hand_made_answers(template, params, question, answer):
    p = hand_problem(template, **params)
    assert p.question == question
    assert p.answer == answer


def test_hand_made_single_shape_and_largest_kinds():
    one = ShapesProblem(-1, (300, 300), (250, 250, 250), (_circle("orange", 150, 150, 40),), 7, ())
    assert one.answer == "1, 1, orange"
    assert ShapesProblem(-1, (300, 300), (250, 250, 250), one.shapes, 5, ()).answer == "circle"
    tri = Shape("triangle", "green", SPEC_COLOURS["green"], ((20, 200), (180, 200), (100, 40)), 2)  # 12800
    sq = _box("square", "yellow", 200, 20, 280, 100)  # 6400
    two = (sq, tri)
    assert ShapesProblem(-1, (300, 300), (250, 250, 250), two, 4, ()).answer == "green"
    assert ShapesProblem(-1, (300, 300), (250, 250, 250), two, 5, ()).answer == "triangle"
    assert ShapesProblem(-1, (300, 300), (250, 250, 250), two, 7, ()).answer == "2, 0, green"
    assert ShapesProblem(-1, (300, 300), (250, 250, 250), two, 6,
                         (("kind1", "circle"), ("kind2", "triangle"))).answer == "-1"


# -- 5. the checker --------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "<think>5 shapes, 2 circles, purple is largest</think>5, 2, purple",
    "</think>5, 2, purple",
    "reasoning</think>\n  5, 2, purple  \n",
    "reasoning</think> 5, 2, purple.",
    "reasoning</think>\n5, 2, purple.\n",
    "a</think>b</think>5, 2, purple",  # the last </think> counts
])
def test_checker_accepts(text):
    assert final_answer(text) == "5, 2, purple"
    assert is_correct(text, "5, 2, purple")
    assert shapes_reward(text, "5, 2, purple") == 1.0


@pytest.mark.parametrize("text, answer", [
    ("5, 2, purple", "5, 2, purple"),  # no </think>
    ("<think>the answer is 5, 2, purple", "5, 2, purple"),
    ("<think>5, 2, purple</think>", "5, 2, purple"),  # the answer only inside the reasoning
    ("<think>5, 2, purple</think>I am not sure", "5, 2, purple"),
    ("</think>5, 2, purple</think>", "5, 2, purple"),
    ("</think>5, 2, Purple", "5, 2, purple"),
    ("</think>5,2,purple", "5, 2, purple"),
    ("</think>5 ,2 ,purple", "5, 2, purple"),
    ("</think>5, 2, purple..", "5, 2, purple"),
    ("</think>5, 2, purple!", "5, 2, purple"),
    ("</think>The answer is 5, 2, purple", "5, 2, purple"),
    ("</think>5, 2, purple is the answer", "5, 2, purple"),
    ("</think>05", "5"),
    ("</think>5.0", "5"),
    ("</think>+1", "1"),
    ("</think>-1", "1"),
    ("</think>1", "-1"),
    ("</think>five", "5"),
    ("</think>Purple", "purple"),
    ("</think>purple shape", "purple"),
    ("</think>", "5"),
])
def test_checker_rejects(text, answer):
    assert not is_correct(text, answer)
    if "</think>" in text:
        assert shapes_reward(text, answer) == 0.0


def test_checker_without_think_end():
    assert final_answer("5, 2, purple") is None
    assert not is_correct("5, 2, purple", "5, 2, purple")
    assert is_correct("</think>-1", "-1") and is_correct("</think> 0.", "0")


@pytest.mark.parametrize("text, answer, reward", [
    ("5, 2, purple", "5, 2, purple", 1.0),  # a compacted message: the text after </think> already
    ("  5, 2, purple.\n", "5, 2, purple", 1.0),
    ("-1", "-1", 1.0),
    ("5, 2, purple", "5, 2, red", 0.0),
    ("5, 2, purple..", "5, 2, purple", 0.0),
    ("The answer: 5, 2, purple", "5, 2, purple", 0.0),
    ("05", "5", 0.0),
    ("+1", "1", 0.0),
])
def test_reward_reads_a_compacted_message_whole(text, answer, reward):
    assert shapes_reward(text, answer) == reward


def test_reward_of_generated_problems():
    for seed in range(14):
        p = generate(seed)
        assert shapes_reward(f"<think>...</think>{p.answer}", p.answer) == 1.0
        assert shapes_reward(f"<think>{p.answer}</think>", p.answer) == 0.0
        assert shapes_reward(p.reasoning(), p.answer) == 1.0  # the trace ends in </think> and the answer


# -- 6. the bundled demo ---------------------------------------------------------------------------------


def _demo():
    meta = json.loads((ASSETS / "demo_problem.json").read_text())
    return meta, analyse(Image.open(ASSETS / meta["image"]))


def test_demo_answer_from_its_pixels():
    meta, an = _demo()
    assert meta["image"] == "demo_shapes.png"
    template, params = parse_question(meta["question"])
    assert template == 7
    assert all(b.kind != "?" for b in an.blobs)
    facts = [(b.colour, b.kind, b.area) for b in an.blobs]
    assert len(facts) == 5
    assert sum(k == "circle" for _, k, _ in facts) == 2
    by_area = sorted(an.blobs, key=lambda b: -b.area)
    assert by_area[0].colour == "purple" and by_area[0].kind == "rectangle"
    # the spec quotes the demo's filled pixels (outline excluded): purple 14,625 vs red 13,225
    assert len(by_area[0].fill) == 14_625 and len(by_area[1].fill) == 13_225 and by_area[1].colour == "red"
    assert by_area[0].area >= 1.10 * by_area[1].area
    assert spec_answer(template, params, facts) == meta["answer"] == "5, 2, purple"
    assert is_correct("<think>...</think>5, 2, purple.", meta["answer"])


def test_demo_is_an_instance_of_the_distribution():
    _, an = _demo()
    w, h = an.size
    assert 224 <= w <= 512 and 224 <= h <= 512
    assert all(235 <= c <= 255 for c in an.background)
    for i, b in enumerate(an.blobs):
        assert 0.015 * 0.97 <= b.area / (w * h) <= 0.12 * 1.03
        assert (b.fill == b.fill[0]).all()
        assert all(abs(x - r) <= 12 for x, r in zip(b.rgb, SPEC_COLOURS[b.colour]))
        if b.kind == "rectangle":
            assert b.aspect >= 1.45
        for o in an.blobs[i + 1:]:
            assert _min_distance(b, o) >= 9


def test_demo_quad_and_circle_outlines_are_2_to_3_px():
    _, an = _demo()
    assert all(_edge_runs(an.black, b) <= {2, 3} for b in an.blobs if b.kind != "triangle")


@pytest.mark.xfail(strict=True, reason=(
    "the bundled demo_shapes.png outlines its green triangle ~1 px wide (360 black px along a 360-px "
    "pixel perimeter, one black pixel per row); SHAPES.md says 2-3 px (PIL's polygon stroke, which the generator no longer uses)"))
def test_demo_triangle_outline_is_2_to_3_px():
    _, an = _demo()
    (tri,) = [b for b in an.blobs if b.kind == "triangle"]
    assert 1.75 <= int(an.black[tri.ys, tri.xs].sum()) / _pixel_perimeter(tri) <= 3.5


# -- 7. training and held-out seeds are disjoint ---------------------------------------------------------


def test_seed_splits():
    from step3vl_pacore.recipes import shapes as recipe
    from step3vl_pacore.recipes import shapes_data as data

    assert S.HELD_OUT_SEEDS == range(0, 500)
    assert S.TRAIN_SEED_START >= 500
    assert S.TRAIN_SEED_START >= 1_000_000  # SHAPES.md: training uses seeds >= 1,000,000
    for s in (0, 1, 6, 7, 499):
        assert generate(s).template == s % 7 + 1

    defaults = {f.name: f.default for f in dataclasses.fields(recipe.ShapesRecipe)
                if f.default is not dataclasses.MISSING}
    toy = recipe.ShapesRecipe.toy(Path("/nonexistent"))
    for r in (defaults, dataclasses.asdict(toy)):
        used = {
            # the pre-training records, and the tokenizer's corpus (3000 problems from the same start)
            "pretrain": range(data.PRETRAIN_SEEDS, data.PRETRAIN_SEEDS + max(r["pretrain_examples"], 3000)),
            "rl": range(data.RL_SEEDS, data.RL_SEEDS + r["rl_steps"] * r["rl_problems"]),
            "pools": range(data.POOL_SEEDS, data.POOL_SEEDS + r["pool_problems"]),
        }
        for name, rng in used.items():
            assert rng.start >= S.TRAIN_SEED_START, name
            assert len(rng) > 0
        names = list(used)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                ra, rb = used[a], used[b]
                assert ra.stop <= rb.start or rb.stop <= ra.start, f"{a} {ra} overlaps {b} {rb}"
        # the held-out-loss problems are neither training nor evaluation problems
        held = max(8, r["eval_problems"] // 2, max(4, r["eval_problems"] // 5))
        loss = range(recipe.EVAL_LOSS_SEEDS, recipe.EVAL_LOSS_SEEDS + held)
        assert loss.start >= S.HELD_OUT_SEEDS.stop and loss.stop <= S.TRAIN_SEED_START
        assert r["eval_problems"] <= len(S.HELD_OUT_SEEDS)


def test_synthesis_trace_tallies_the_references_then_reads_the_picture():
    p = generate(6)  # template 7
    refs = [p.answer, "3, 2, orange.", p.answer, "", "  " + p.answer + " ", "3, 2, orange", "2, 1, red"]
    trace = p.synthesis_reasoning(refs)
    first, rest = trace.split("\n", 1)
    # counted by hand: the answer 3 times (a trailing full stop and spaces do not matter), "3, 2, orange" twice,
    # "2, 1, red" once; the empty message is left out; ties in count go in string order
    assert first == f"references: {p.answer} (3) | 3, 2, orange (2) | 2, 1, red (1)"
    assert rest == p.reasoning()
    assert shapes_reward(trace, p.answer) == 1.0
    assert p.synthesis_reasoning([]).startswith("references: none\n")


def test_perception_reads_the_listing_against_the_picture():
    p = generate(3)
    truth = p.left_to_right
    right = p.reasoning()
    seen = S.perception(p, right)
    assert (seen.listed, seen.actual, seen.kinds_right, seen.colours_right) == (len(truth), len(truth), len(truth),
                                                                               len(truth))
    # Hand-made errors: the first shape's kind and the second's colour named wrong, one shape left out.
    wrong_kind = next(k for k in S.KINDS if k != truth[0].kind)
    lines = [f"1 {truth[0].colour} {wrong_kind} size 5"]
    if len(truth) > 1:
        wrong_colour = next(c for c in S.COLOURS if c != truth[1].colour)
        lines.append(f"2 {wrong_colour} {truth[1].kind} size 4")
    text = "\n".join(lines) + "\nsome reasoning 3 red circle size 2 is not a listing line\n</think>\n1 red circle size 9"
    seen = S.perception(p, text)
    assert seen.listed == len(lines) and seen.compared == min(len(lines), len(truth))
    assert seen.kinds_right == len(lines) - 1 and seen.kind_pairs[0] == (truth[0].kind, wrong_kind)
    assert seen.colours_right == 1  # the answer part after </think> is never read as a listing


def test_perception_summary_counts_by_hand():
    from step3vl_pacore.recipes.evaluate import perception_summary, wilson

    seen = [{"listed": 2, "actual": 2, "compared": 2, "kinds_right": 1, "colours_right": 2,
             "kind_pairs": [("circle", "circle"), ("square", "rectangle")]},
            {"listed": 1, "actual": 3, "compared": 1, "kinds_right": 1, "colours_right": 0,
             "kind_pairs": [("triangle", "triangle")]}]
    out = perception_summary(seen)
    assert out["count_right"]["rate"] == 0.5 and out["kind_right"]["rate"] == pytest.approx(2 / 3)
    assert out["colour_right"]["rate"] == pytest.approx(2 / 3) and out["kind_right"]["ci95"] == list(wilson(2, 3))
    assert out["kind_confusion"]["square"] == {"rectangle": 1}


def test_synthesis_trace_with_an_own_reading_closes_with_the_canonical_answer():
    p = generate(6)  # template 7
    refs = [p.answer, "3, 2, orange", p.answer]
    wrong_reading = "1 red circle size 5\nshapes: 1\ncircles: #1 = 1\nlargest: #1 red circle\n</think>\n1, 1, red"
    trace = p.synthesis_reasoning(refs, wrong_reading)
    assert trace == (f"references: {p.answer} (2) | 3, 2, orange (1)\n"
                     "1 red circle size 5\nshapes: 1\ncircles: #1 = 1\nlargest: #1 red circle\n</think>\n" + p.answer)
    assert shapes_reward(trace, p.answer) == 1.0
    # the true reading given as the reading: the same trace as without one
    assert p.synthesis_reasoning(refs, p.reasoning()) == p.synthesis_reasoning(refs)

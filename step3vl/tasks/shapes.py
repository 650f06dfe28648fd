"""The `shapes` task (../shared/SHAPES.md): seeded pictures of simple shapes, questions with checkable answers.

A problem is drawn from one integer seed: the picture (size, background, 1-7 non-overlapping outlined shapes),
the question template (`seed % 7 + 1`, as the held-out split fixes it) and its parameters. Everything about a
problem is a pure function of its seed, so training (seeds >= TRAIN_SEED_START) and evaluation (seeds 0-499)
never share a problem.

Besides the question and the canonical answer, a problem carries the two texts the demo model learns from:
`description()` (a caption for image-text pre-training) and `reasoning()` (a trace that names the shapes left to
right with their size, numbered so counting is reading the last number, then works the question out and ends in
`</think>` and the answer).
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw

KINDS = ("circle", "square", "rectangle", "triangle")
MAX_SHAPES = 7
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 50, 50), "green": (40, 170, 70), "blue": (50, 110, 220),
    "yellow": (240, 200, 40), "purple": (150, 80, 200), "orange": (245, 140, 30),
}
TEMPLATES = {
    1: "How many shapes are in the picture?",
    2: "How many {colour} shapes are there?",
    3: "How many {kind}s are there?",
    4: "What colour is the largest shape?",
    5: "What kind of shape is the largest one?",
    6: "How many more {kind1}s than {kind2}s are there?",
    7: ("How many shapes are in the picture? Count the circles among them, name the colour of the largest "
        "shape, and give the final answer as: shapes, circles, colour."),
}
TEMPLATE_NAMES = {1: "count", 2: "colour_count", 3: "kind_count", 4: "largest_colour", 5: "largest_kind",
                  6: "kind_difference", 7: "composite"}
LARGEST_TEMPLATES = (4, 5, 7)
TRAIN_SEED_START = 1_000_000
HELD_OUT_SEEDS = range(0, 500)
THINK_END = "</think>"

MIN_SIDE, MAX_SIDE = 224, 512
MIN_AREA, MAX_AREA = 0.015, 0.12  # of the picture's area
GAP = 8  # px between shapes' bounding boxes (outline included)
LARGEST_MARGIN = 1.10
COLOUR_JITTER = 12


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    rgb: tuple[int, int, int]
    points: tuple[tuple[float, float], ...]  # polygon vertices; for a circle: ((cx, cy), (r, r))
    outline: int  # px

    @property
    def area(self) -> float:
        """Filled area in px² (the interior the outline encloses, outline included)."""
        if self.kind == "circle":
            return math.pi * self.points[1][0] ** 2
        return _polygon_area(self.points)

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        if self.kind == "circle":
            (cx, cy), (r, _) = self.points
            return cx - r, cy - r, cx + r, cy + r
        xs, ys = [p[0] for p in self.points], [p[1] for p in self.points]
        return min(xs), min(ys), max(xs), max(ys)


@dataclass(frozen=True)
class ShapesProblem:
    seed: int
    size: tuple[int, int]  # (w, h)
    background: tuple[int, int, int]
    shapes: tuple[Shape, ...]
    template: int
    params: tuple[tuple[str, str], ...]  # template fields, e.g. (("colour", "red"),)

    @property
    def id(self) -> str:
        return f"shapes-{self.seed}"

    @property
    def question(self) -> str:
        return TEMPLATES[self.template].format(**dict(self.params))

    @property
    def by_size(self) -> list[Shape]:
        """The shapes from the largest filled area down (ties: drawing order)."""
        return sorted(self.shapes, key=lambda s: -s.area)

    def count(self, kind: str | None = None, colour: str | None = None) -> int:
        return sum((kind is None or s.kind == kind) and (colour is None or s.colour == colour) for s in self.shapes)

    @property
    def answer(self) -> str:
        p, largest = dict(self.params), self.by_size[0]
        return {
            1: lambda: str(len(self.shapes)),
            2: lambda: str(self.count(colour=p.get("colour"))),
            3: lambda: str(self.count(kind=p.get("kind"))),
            4: lambda: largest.colour,
            5: lambda: largest.kind,
            6: lambda: str(self.count(kind=p.get("kind1")) - self.count(kind=p.get("kind2"))),
            7: lambda: f"{len(self.shapes)}, {self.count(kind='circle')}, {largest.colour}",
        }[self.template]()

    def image(self) -> Image.Image:
        return render(self)

    @property
    def left_to_right(self) -> list[Shape]:
        """The shapes by the x of their centre (the order the traces name them in: a local rule the model can
        learn before it can rank sizes)."""
        return sorted(self.shapes, key=lambda s: (s.bbox[0] + s.bbox[2], s.bbox[1] + s.bbox[3]))

    def size_percent(self, shape: Shape) -> int:
        """A shape's filled area in whole percent of the picture's (what the traces write beside it)."""
        return max(1, round(100 * shape.area / (self.size[0] * self.size[1])))

    def description(self) -> str:
        """A caption: every shape, left to right."""
        names = [f"{_article(s.colour)} {s.colour} {s.kind}" for s in self.left_to_right]
        n = len(names)
        listed = names[0] if n == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        return f"The picture shows {n} shape{'s' * (n != 1)}, from left to right: {listed}."

    def reasoning(self) -> str:
        """The trace the model learns to write: the shapes numbered left to right with their size in percent of
        the picture, then the steps the question needs, then `</think>` and the canonical answer."""
        ordered = self.left_to_right
        lines = [f"{i} {s.colour} {s.kind} size {self.size_percent(s)}" for i, s in enumerate(ordered, 1)]
        p = dict(self.params)

        def tally(label: str, keep) -> str:
            hits = [f"#{i}" for i, s in enumerate(ordered, 1) if keep(s)]
            return f"{label}: {' '.join(hits) if hits else 'none'} = {len(hits)}"

        t = self.template
        if t in (1, 7):
            lines.append(f"shapes: {len(ordered)}")
        if t == 2:
            lines.append(tally(p["colour"], lambda s: s.colour == p["colour"]))
        if t == 3:
            lines.append(tally(f"{p['kind']}s", lambda s: s.kind == p["kind"]))
        if t == 7:
            lines.append(tally("circles", lambda s: s.kind == "circle"))
        if t in (4, 5, 7):
            big = self.by_size[0]
            lines.append(f"largest: #{ordered.index(big) + 1} {big.colour} {big.kind}")
        if t == 6:
            a, b = self.count(kind=p["kind1"]), self.count(kind=p["kind2"])
            lines.append(tally(f"{p['kind1']}s", lambda s: s.kind == p["kind1"]))
            lines.append(tally(f"{p['kind2']}s", lambda s: s.kind == p["kind2"]))
            lines.append(f"{a} - {b} = {a - b}")
        return "\n".join(lines) + f"\n{THINK_END}\n{self.answer}"

    def synthesis_reasoning(self, references: list[str], reading: str | None = None) -> str:
        """The trace for a PaCoRe synthesis prompt over `references` (earlier trajectories' conclusions): their
        answers tallied, most frequent first, then the picture read again, then the answer.

        reading: None, the true reading of `reasoning()` (which then settles the answer by itself); or a model's
        own reading of the picture (a sampled trajectory's reasoning, right or wrong), closed with the *canonical*
        answer — so what is learned is the answer given the tally and a fallible reading, i.e. when a reading
        should outvote the references and when not."""
        tally = Counter(_strip_stop(r.strip()) for r in references if r and r.strip())
        listed = " | ".join(f"{a} ({n})" for a, n in sorted(tally.items(), key=lambda kv: (-kv[1], kv[0])))
        head = f"references: {listed or 'none'}\n"
        if reading is None:
            return head + self.reasoning()
        return head + reading.split(THINK_END)[0].strip() + f"\n{THINK_END}\n{self.answer}"

    def messages(self, image: Any = None) -> list[dict]:
        """The problem as a chat (the official PaCoRe input format's `messages`); `image` defaults to the
        rendered picture (a PIL image)."""
        return [{"role": "user", "content": [{"type": "image", "image": image if image is not None else self.image()},
                                             {"type": "text", "text": self.question}]}]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# -- checking -------------------------------------------------------------------------------------------


def final_answer(text: str) -> str | None:
    """The text after the last `</think>`, stripped of surrounding whitespace and one trailing full stop;
    None when the text has no `</think>` (such a response is wrong)."""
    if THINK_END not in text:
        return None
    return _strip_stop(text.rsplit(THINK_END, 1)[1].strip())


def is_correct(text: str, answer: str) -> bool:
    return final_answer(text) == answer


def shapes_reward(text: str, answer: Any) -> float:
    """The outcome reward of a response: 1.0 when its final answer equals the canonical answer, else 0.0.
    A compacted message (no `</think>`: the text after it already) is read whole."""
    got = final_answer(text) if THINK_END in text else _strip_stop(text.strip())
    return float(got == str(answer))


def _strip_stop(s: str) -> str:
    return s[:-1].rstrip() if s.endswith(".") else s


# -- generation ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Perception:
    """What a response's listing ("3 green triangle size 5" lines) says the model saw, against the picture:
    whether it listed as many shapes, and, position by position over the shapes both list, how many kinds and
    colours it named right. Separates seeing from reasoning: a wrong answer with a right listing is a reasoning
    error."""

    listed: int
    actual: int
    compared: int  # min(listed, actual)
    kinds_right: int
    colours_right: int
    kind_pairs: tuple[tuple[str, str], ...]  # (true kind, listed kind) per compared position


_LISTING = re.compile(r"^\s*(\d+) (\w+) (\w+) size \d+\s*$")


def perception(problem: ShapesProblem, text: str) -> Perception:
    reasoning = text.split("</think>")[0]
    listed = [m.groups() for m in map(_LISTING.match, reasoning.splitlines()) if m]
    truth = problem.left_to_right
    pairs = list(zip(truth, listed))
    return Perception(len(listed), len(truth), len(pairs), sum(s.kind == got[2] for s, got in pairs),
                      sum(s.colour == got[1] for s, got in pairs), tuple((s.kind, got[2]) for s, got in pairs))


def template_of(seed: int) -> int:
    return seed % 7 + 1


def generate(seed: int, num_shapes: int | None = None) -> ShapesProblem:
    """The problem of `seed`: deterministic across processes and platforms (random.Random, no hash()).
    num_shapes: a picture of exactly that many shapes (a training curriculum; the task draws 1 to 7)."""
    if num_shapes is not None and not 1 <= num_shapes <= MAX_SHAPES:
        raise ValueError(f"num_shapes = {num_shapes}: the task has 1 to {MAX_SHAPES} shapes")
    rng = random.Random(f"shapes/{seed}" if num_shapes is None else f"shapes/{seed}/n{num_shapes}")
    template = template_of(seed)
    for _ in range(1000):
        w, h = rng.randint(MIN_SIDE, MAX_SIDE), rng.randint(MIN_SIDE, MAX_SIDE)
        shapes = _place_shapes(rng, w, h, num_shapes or rng.randint(1, MAX_SHAPES))
        if shapes is None:
            continue
        if template in LARGEST_TEMPLATES and not _unique_largest(shapes):
            continue
        background = tuple(rng.randint(235, 255) for _ in range(3))
        return ShapesProblem(seed, (w, h), background, tuple(shapes), template, _params(rng, template, shapes))
    raise RuntimeError(f"shapes: seed {seed} found no valid picture in 1000 draws")  # never seen in practice


def _unique_largest(shapes: list[Shape]) -> bool:
    areas = sorted((s.area for s in shapes), reverse=True)
    return len(areas) == 1 or areas[0] >= LARGEST_MARGIN * areas[1]


def _params(rng: random.Random, template: int, shapes: list[Shape]) -> tuple[tuple[str, str], ...]:
    present_kinds = sorted({s.kind for s in shapes})
    present_colours = sorted({s.colour for s in shapes})
    # Mostly ask about something in the picture, so that "0" is not the usual answer.
    pick = lambda present, every: rng.choice(present if rng.random() < 0.7 else list(every))  # noqa: E731
    if template == 2:
        return (("colour", pick(present_colours, COLOURS)),)
    if template == 3:
        return (("kind", pick(present_kinds, KINDS)),)
    if template == 6:
        k1 = pick(present_kinds, KINDS)
        k2 = rng.choice([k for k in KINDS if k != k1])
        return (("kind1", k1), ("kind2", k2))
    return ()


def _place_shapes(rng: random.Random, w: int, h: int, n: int) -> list[Shape] | None:
    boxes: list[tuple[float, float, float, float]] = []
    shapes = []
    for _ in range(n):
        for _attempt in range(60):
            shape = _random_shape(rng, w, h)
            box = shape.bbox
            pad = shape.outline  # the outline is drawn centred on the edge
            box = (box[0] - pad, box[1] - pad, box[2] + pad, box[3] + pad)
            if box[0] < 0 or box[1] < 0 or box[2] > w - 1 or box[3] > h - 1:
                continue
            if any(_near(box, b) for b in boxes):
                continue
            boxes.append(box)
            shapes.append(shape)
            break
        else:
            return None
    return shapes


def _near(a, b) -> bool:
    return not (a[2] + GAP <= b[0] or b[2] + GAP <= a[0] or a[3] + GAP <= b[1] or b[3] + GAP <= a[1])


def _random_shape(rng: random.Random, w: int, h: int) -> Shape:
    kind = rng.choice(KINDS)
    colour = rng.choice(sorted(COLOURS))
    rgb = tuple(max(0, min(255, c + rng.randint(-COLOUR_JITTER, COLOUR_JITTER))) for c in COLOURS[colour])
    area = rng.uniform(MIN_AREA, MAX_AREA) * w * h
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    outline = rng.randint(2, 3)
    if kind == "circle":
        r = math.sqrt(area / math.pi)
        return Shape(kind, colour, rgb, ((cx, cy), (r, r)), outline)
    if kind == "square":
        half = math.sqrt(area) / 2
        pts = ((cx - half, cy - half), (cx + half, cy - half), (cx + half, cy + half), (cx - half, cy + half))
        return Shape(kind, colour, rgb, pts, outline)
    if kind == "rectangle":
        ratio = rng.uniform(1.5, 2.8)
        long, short = math.sqrt(area * ratio), math.sqrt(area / ratio)
        hw, hh = (long / 2, short / 2) if rng.random() < 0.5 else (short / 2, long / 2)
        pts = ((cx - hw, cy - hh), (cx + hw, cy - hh), (cx + hw, cy + hh), (cx - hw, cy + hh))
        return Shape(kind, colour, rgb, pts, outline)
    return Shape(kind, colour, rgb, _triangle(rng, cx, cy, area), outline)


def _triangle(rng: random.Random, cx: float, cy: float, area: float) -> tuple[tuple[float, float], ...]:
    """A triangle of the given area with every angle >= 25°, randomly rotated, centred on its centroid."""
    while True:
        a = rng.uniform(25, 130)
        b = rng.uniform(25, 155 - a)
        if 180 - a - b >= 25:
            break
    # Side c = 1 on the x axis, angles a at (0, 0) and b at (1, 0).
    ta, tb = math.tan(math.radians(a)), math.tan(math.radians(b))
    x = tb / (ta + tb)
    pts = [(0.0, 0.0), (1.0, 0.0), (x, x * ta)]
    scale = math.sqrt(area / _polygon_area(pts))
    theta = rng.uniform(0, 2 * math.pi)
    mx, my = sum(p[0] for p in pts) / 3, sum(p[1] for p in pts) / 3
    out = []
    for px, py in pts:
        dx, dy = (px - mx) * scale, (py - my) * scale
        out.append((cx + dx * math.cos(theta) - dy * math.sin(theta), cy + dx * math.sin(theta) + dy * math.cos(theta)))
    return tuple(out)


def _polygon_area(pts) -> float:
    n = len(pts)
    return abs(sum(pts[i][0] * pts[(i + 1) % n][1] - pts[(i + 1) % n][0] * pts[i][1] for i in range(n))) / 2


# -- rendering -----------------------------------------------------------------------------------------


def render(problem: ShapesProblem) -> Image.Image:
    img = Image.new("RGB", problem.size, problem.background)
    draw = ImageDraw.Draw(img)
    for s in problem.shapes:
        if s.kind == "circle":
            draw.ellipse(s.bbox, fill=s.rgb, outline=(0, 0, 0), width=s.outline)
        elif s.kind == "triangle":
            # PIL's polygon outline comes out near 1 px on slanted edges; instead the outline is the triangle in
            # black with the triangle inset by `outline` px (scaled about its incentre) filled on top: exactly
            # `outline` px on every edge, inside the shape like the other kinds' outlines.
            draw.polygon(s.points, fill=(0, 0, 0))
            draw.polygon(_inset_triangle(s.points, s.outline), fill=s.rgb)
        else:
            draw.polygon(s.points, fill=s.rgb, outline=(0, 0, 0), width=s.outline)
    return img


def _inset_triangle(pts, d: float):
    """The triangle whose edges lie `d` inside those of `pts`: `pts` scaled about its incentre by (r - d) / r."""
    (ax, ay), (bx, by), (cx, cy) = pts
    a, b, c = math.dist(pts[1], pts[2]), math.dist(pts[0], pts[2]), math.dist(pts[0], pts[1])
    p = a + b + c
    ix, iy = (a * ax + b * bx + c * cx) / p, (a * ay + b * by + c * cy) / p
    k = max(0.0, 1 - d / (2 * _polygon_area(pts) / p))
    return [(ix + (x - ix) * k, iy + (y - iy) * k) for x, y in pts]


# -- wrong answers that look right (for references in synthesis pre-training) --------------------------


def near_miss(answer: str, rng: random.Random) -> str:
    """A plausible wrong answer: an integer off by one or two, a name swapped for another of its kind; in a
    composite answer one or more of the parts."""
    parts = answer.split(", ")
    if len(parts) > 1:
        idx = [i for i in range(len(parts)) if rng.random() < 0.5] or [rng.randrange(len(parts))]
        return ", ".join(near_miss(p, rng) if i in idx else p for i, p in enumerate(parts))
    if re.fullmatch(r"-?\d+", answer):
        return str(int(answer) + rng.choice((-2, -1, -1, 1, 1, 2)))
    pool = list(COLOURS) if answer in COLOURS else list(KINDS)
    return rng.choice([p for p in pool if p != answer])

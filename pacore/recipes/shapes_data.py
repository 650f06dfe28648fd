"""The data of the `shapes` recipe: the tokenizer's corpus, the pre-training records and the RL problems.

Every record is a pure function of its problem seed (step3vl/tasks/shapes.py), so a stage rebuilt after an
interruption writes the same files. Pictures are written once as PNG files that the records name by path
(the trainer plans them from their headers and decodes them when a step encodes them).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from step3vl.processor.image import ImageSpec, preprocess_image
from step3vl.tasks.shapes import (COLOURS, KINDS, TEMPLATES, TRAIN_SEED_START, ShapesProblem, generate, near_miss)
from step3vl.train.rl import RLPrompt

from step3vl_pacore.template import synthesis_messages

# Disjoint training seed ranges per use (all >= TRAIN_SEED_START, so never a held-out problem).
PRETRAIN_SEEDS = TRAIN_SEED_START
RL_SEEDS = TRAIN_SEED_START + 5_000_000
POOL_SEEDS = TRAIN_SEED_START + 6_000_000
SFT_SEEDS = TRAIN_SEED_START + 7_000_000
FEW_SHAPES_SEEDS = TRAIN_SEED_START + 8_000_000  # the curriculum's pictures of one or two shapes
VISION_SEEDS = TRAIN_SEED_START + 9_000_000  # the vision stage's single-shape pictures
VISION_LABELS = {"kind": len(KINDS), "colour": len(COLOURS)}


def seed_of(problem_id: str) -> int:
    """The seed of a problem record's id (`shapes-<seed>`)."""
    return int(problem_id.rsplit("-", 1)[1])


def tokenizer_corpus(n: int = 3000) -> list[str]:
    """Texts the demo tokenizer's merges are learned from: traces, captions, every question and the synthesis
    template's words, so the task's words are single tokens."""
    texts = []
    for seed in range(PRETRAIN_SEEDS, PRETRAIN_SEEDS + n):
        p = generate(seed)
        texts += [p.question, p.reasoning(), p.description()]
    texts += [t.format(colour=c, kind=k, kind1=k, kind2=k2) for t in TEMPLATES.values() for c in COLOURS
              for k in KINDS for k2 in KINDS]
    texts += [synthesis_messages([{"role": "user", "content": "q"}], ["a", "b"])[0]["content"]] * 50
    return texts


def image_path(images: Path, problem: ShapesProblem) -> Path:
    path = images / f"{problem.seed}.png"
    if not path.is_file():
        tmp = path.with_suffix(".tmp.png")
        problem.image().save(tmp)
        tmp.replace(path)  # a kill mid-write never leaves a truncated picture under the final name
    return path


def user_turn(problem: ShapesProblem, images: Path) -> list[dict]:
    """The question as a user turn, its picture by path (written under `images` if missing)."""
    image = str(image_path(images, problem))
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": problem.question}]}]


def synthetic_references(problem: ShapesProblem, rng: random.Random) -> list[str]:
    """A reference set like the ones PaCoRe's later rounds see: 4-24 conclusions, each the right answer with a
    per-set probability in [0.2, 0.95], otherwise a near miss."""
    p_right = rng.uniform(0.2, 0.95)
    n = rng.choice([4, rng.randint(16, 24)])
    return [problem.answer if rng.random() < p_right else near_miss(problem.answer, rng) for _ in range(n)]


def pretrain_records(images: Path, n: int, synthesis_fraction: float = 0.2,
                     caption_fraction: float = 0.15, few_shapes_fraction: float = 0.0) -> list[dict]:
    """n records from n training problems: a caption (image-text), a question answered with its reasoning
    trace, or (for `synthesis_fraction`) the synthesis prompt over synthetic references answered with the
    same trace: the model learns to read the picture itself when references disagree.
    few_shapes_fraction: that share of the problems has pictures of one or two shapes (their own seed range): a
    shape's kind is then learned without first having to find which region of a crowded picture is the k-th
    from the left (the binding that left kinds at chance while colours were learned, bench/RESULTS.md)."""
    records = []
    for seed in range(PRETRAIN_SEEDS, PRETRAIN_SEEDS + n):
        rng = random.Random(f"pretrain/{seed}")
        few = random.Random(f"pretrain/few/{seed}")  # its own stream: the other draws stay as without the curriculum
        if few.random() < few_shapes_fraction:
            p = generate(FEW_SHAPES_SEEDS + seed - PRETRAIN_SEEDS, num_shapes=few.choice([1, 1, 2]))
        else:
            p = generate(seed)
        u = rng.random()
        if u < caption_fraction:
            records.append({"text": p.description(), "images": [str(image_path(images, p))]})  # the picture comes first
            continue
        record = answered_record(p, images)
        if u < caption_fraction + synthesis_fraction:
            record["messages"][:1] = synthesis_messages(record["messages"][:1], synthetic_references(p, rng))
        records.append(record)
    return records


def answered_record(problem: ShapesProblem, images: Path) -> dict:
    """The question answered with its reasoning trace, as a chat training record."""
    return {"messages": user_turn(problem, images)
            + [{"role": "assistant", "content": problem.reasoning()}]}


def problem_record(problem: ShapesProblem, images: Path) -> dict:
    """The official PaCoRe input format ({"id", "messages", "ground_truth"}), picture by path."""
    return {"id": problem.id, "messages": user_turn(problem, images),
            "ground_truth": problem.answer, "category": problem.template}


def rl_prompts(images: Path, start: int, n: int) -> list[RLPrompt]:
    out = []
    for seed in range(start, start + n):
        rec = problem_record(generate(seed), images)
        out.append(RLPrompt(rec["messages"], rec["ground_truth"], id=rec["id"]))
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    tmp.replace(path)
    return path


def synthesis_records(problem_ids: list[str], pools: dict[str, list[str]], images: Path, draws: int, seed: int,
                      min_refs: int = 16, max_refs: int = 24,
                      readings: dict[str, list[str]] | None = None) -> list[dict]:
    """Synthesis prompts over the model's own cached messages (`draws` reference sets per problem, 16-24 each,
    as PaCoRe's episodes draw them), each answered with the tally-then-read trace of `synthesis_reasoning`.
    readings: per problem, the model's own readings of the picture (its trajectories' reasoning); each trace then
    reads with one of them, drawn at random, and closes with the canonical answer (None, or a problem without
    any: the true reading)."""
    records = []
    for pid in problem_ids:
        pool = pools.get(pid) or []
        if not pool:
            continue
        own = (readings or {}).get(pid) or []
        problem = generate(seed_of(pid))
        for k in range(draws):
            rng = random.Random(f"synthesis-sft/{seed}/{pid}/{k}")
            refs = rng.sample(pool, min(len(pool), rng.randint(min_refs, max_refs)))
            reading = rng.choice(own) if own else None
            turn = synthesis_messages(user_turn(problem, images), refs)
            trace = problem.synthesis_reasoning(refs, reading)
            records.append({"messages": turn + [{"role": "assistant", "content": trace}]})
    return records


def pool_readings(record: dict) -> list[str]:
    """The reasoning of a PaCoRe result record's first-round trajectories (recorded with record_reasoning):
    the model's own readings of the picture, before any reference was shown to it. A trajectory that never
    closed its reasoning has none (its whole text is its message) and is left out."""
    rounds = record.get("round_responses") or [[]]
    return [e["reasoning_content"] for e in rounds[0]
            if isinstance(e, dict) and not e.get("dropped") and (e.get("reasoning_content") or "").strip()]


def vision_batch(step: int, batch_size: int, spec: ImageSpec) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Step `step` of the vision stage: `batch_size` pictures of one shape each (rendered in memory, a pure
    function of the step), as the model's global views, labelled with the shape's kind and colour."""
    pixels, kinds, colours = [], [], []
    for i in range(step * batch_size, (step + 1) * batch_size):
        p = generate(VISION_SEEDS + i, num_shapes=1)
        pixels.append(preprocess_image(p.image(), spec).global_view)
        kinds.append(KINDS.index(p.shapes[0].kind))
        colours.append(list(COLOURS).index(p.shapes[0].colour))
    return torch.stack(pixels), {"kind": torch.tensor(kinds), "colour": torch.tensor(colours)}

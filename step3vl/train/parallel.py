"""Data parallelism for the training loops: each optimizer step's examples split over the ranks, gradients
that sum to the one-process gradient, and the lock-step forward passes that FSDP's collectives need.

The global batch is the same at every world size: a step's examples (what one process would train on in that
step) are dealt to the ranks, each rank packs its share into micro-batches and weights its loss by
world_size / (targets of the whole step). FSDP averages the gradients over the ranks, so the sum of the ranks'
losses, and the update, equal the one-process step's up to float summation order.

Lock step: every rank must run the same sharded modules in the same order (each all-gather and reduce-scatter
is a collective; FSDP's backward prefetching follows the forward order), so
- a rank with fewer micro-batches runs filler ones, weighted 0;
- a micro-batch without an image, when another rank's at the same index has one, gets a stand-in image: one
  more packed sequence, a black picture's image tokens with no targets, which changes no other sequence's
  result (attention never crosses sequences) and adds nothing to the loss.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Sequence, TypeVar

import torch

from step3vl.distributed import DistEnv
from step3vl.model.vlm import ImagePixels, Step3VLForCausalLM
from step3vl.train.data import IGNORE, PackedBatch, TrainExample, pack

B = TypeVar("B")


def filler_example() -> TrainExample:
    """Two tokens with one target: the micro-batch of a rank that has run out of work (weighted 0)."""
    return TrainExample([0, 0], [IGNORE, 0])


def image_tokens(model: Step3VLForCausalLM) -> int:
    """Feature rows of one global view: the patch grid after the two stride-2 downsamplers."""
    v = model.cfg.vision
    side = _halved(_halved(v.image_size // v.patch_size))  # each conv: kernel 3, stride 2, padding 1
    return side * side


def _halved(n: int) -> int:
    return (n + 1) // 2


def with_stand_in(batch: PackedBatch, model: Step3VLForCausalLM) -> PackedBatch:
    """`batch` plus one sequence of a black picture's image tokens, without targets."""
    n = image_tokens(model)
    size = model.cfg.vision.image_size
    pixels = ImagePixels(torch.zeros(3, size, size), torch.zeros(0, 3, size, size))
    long = lambda *xs: torch.cat([x.to(torch.long) for x in xs])  # noqa: E731
    groups = None if batch.prefix_groups is None else batch.prefix_groups + [(n, [])]
    return replace(batch, input_ids=long(batch.input_ids, torch.zeros(n)), positions=long(batch.positions, torch.arange(n)),
                   targets=long(batch.targets, torch.full((n,), IGNORE)), seq_lens=batch.seq_lens + [n],
                   images=batch.images + [pixels], image_mask=torch.cat([batch.image_mask, torch.ones(n, dtype=torch.bool)]),
                   prefix_groups=groups)


def lock_step(env: DistEnv, model: Step3VLForCausalLM, batches: Sequence[B], run: Callable[[int, B, float], None],
              filler: Callable[[], B], has_images: Callable[[B], bool], add_stand_in: Callable[[B], B]) -> None:
    """Call run(k, batch, weight) once per micro-batch, the same number of times on every rank: a rank with fewer
    batches runs `filler()` with weight 0, and a batch without an image gets `add_stand_in(batch)` when another
    rank's batch at the same index has one."""
    count = env.all_max(len(batches)) if env.is_distributed else len(batches)
    vision = getattr(model, "vision_model", None) is not None
    for k in range(count):
        real = k < len(batches)
        batch = batches[k] if real else filler()
        if env.is_distributed and vision:
            mine = has_images(batch)
            if env.all_max(int(mine)) and not mine:
                batch = add_stand_in(batch)
        run(k, batch, 1.0 if real else 0.0)


def lock_step_packed(env: DistEnv, model: Step3VLForCausalLM, batches: Sequence[PackedBatch],
                     run: Callable[[int, PackedBatch, float], None]) -> None:
    """lock_step over packed next-token batches (pre-training, evaluation)."""
    lock_step(env, model, batches, run, lambda: pack([filler_example()]), lambda b: bool(b.images),
              lambda b: with_stand_in(b, model))

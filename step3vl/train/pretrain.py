"""Next-token training on image-text and chat examples: packed micro-batches (no padding), gradient
accumulation with the loss averaged over every target of the optimizer step, AdamW + warm-up cosine,
gradient clipping, optional activation checkpointing and autocast; one process, or N ranks sharded with FSDP2
training the same run (see parallel.py)."""

from __future__ import annotations

import contextlib
import functools
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from step3vl.distributed import DistEnv
from step3vl.model.vlm import Step3VLForCausalLM
from step3vl.processor.image import LazyImageViews
from step3vl.train.checkpoint import load_train_state, read_train_state, save_train_state
from step3vl.train.data import PackedBatch, TrainExample, pack, split_long, token_budget_batches
from step3vl.train.fsdp import shard_model
from step3vl.train.logprobs import next_token_loss
from step3vl.train.optim import OptimConfig, build_optimizer, clip_and_step
from step3vl.train.parallel import lock_step_packed


@dataclass
class PretrainConfig:
    optim: OptimConfig = field(default_factory=OptimConfig)
    max_tokens_per_batch: int = 8192  # tokens of one packed micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    epochs: int = 1
    max_steps: int | None = None  # stop after this many optimizer steps
    train_vision: bool = True  # False freezes the vision encoder and the projector
    shuffle: bool = True
    seed: int = 0
    chunk_rows: int = 1024  # rows of logits alive at once
    activation_checkpointing: bool = False  # recompute each decoder layer in the backward pass
    autocast_dtype: torch.dtype | None = None  # e.g. torch.bfloat16 on a GPU, with fp32 weights
    max_seq_len: int | None = None  # longer text examples train as consecutive windows of this many tokens
    eval_every: int | None = None  # optimizer steps between evaluations on the held-out examples (and at the end)

    def __post_init__(self) -> None:
        for name in ("max_tokens_per_batch", "grad_accum", "epochs", "chunk_rows"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"PretrainConfig.{name} = {getattr(self, name)!r}: must be an int >= 1")
        for name in ("max_steps", "max_seq_len", "eval_every"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"PretrainConfig.{name} = {getattr(self, name)!r}: must be >= 1 or None")


@dataclass
class StepLog:
    step: int  # optimizer steps done, 1-based
    loss: float  # mean cross-entropy over the step's targets
    lr: float
    grad_norm: float
    tokens: int
    targets: int
    seconds: float
    eval_loss: float | None = None  # mean cross-entropy on the held-out examples, when evaluated at this step


def _release_images(batches: list) -> None:
    """Lazily loaded images give their pixels back until the next step that encodes them."""
    for b in batches:
        for im in b.images:
            if isinstance(im, LazyImageViews):
                im.release()


def set_trainable(model: Step3VLForCausalLM, train_vision: bool) -> None:
    model.requires_grad_(True)
    if not train_vision:
        for name in ("vision_model", "vit_large_projector"):
            if hasattr(model, name):
                getattr(model, name).requires_grad_(False)


def enable_activation_checkpointing(model: Step3VLForCausalLM) -> None:
    """Each decoder layer keeps only its input; its activations are recomputed in the backward pass."""
    for layer in model.model.layers:
        if not getattr(layer, "_checkpointed", False):
            layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
            layer._checkpointed = True


def single_process(model: Step3VLForCausalLM) -> DistEnv:
    return DistEnv(0, 1, 0, model.device)


class Pretrainer:
    """env: the run's ranks (init_distributed()); with more than one, the model is sharded here (FSDP2) and each
    rank trains on its share of every step's examples."""

    def __init__(self, model: Step3VLForCausalLM, cfg: PretrainConfig | None = None, env: DistEnv | None = None):
        self.model = model
        self.cfg = cfg or PretrainConfig()
        self.env = env or single_process(model)
        self.steps_done = 0
        self.opt = self.sched = None
        set_trainable(model, self.cfg.train_vision)
        if self.cfg.activation_checkpointing:
            enable_activation_checkpointing(model)
        if self.env.is_distributed:
            shard_model(model, self.env)

    def _micro_batches(self, examples: list[TrainExample]) -> list[list[TrainExample]]:
        order = list(range(len(examples)))
        out: list[list[TrainExample]] = []
        gen = torch.Generator().manual_seed(self.cfg.seed)
        for _ in range(self.cfg.epochs):
            if self.cfg.shuffle:
                order = torch.randperm(len(examples), generator=gen).tolist()
            out += token_budget_batches((examples[i] for i in order), self.cfg.max_tokens_per_batch)
        return out

    def _autocast(self):
        if self.cfg.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.model.device.type, dtype=self.cfg.autocast_dtype)

    def save_state(self, path, source) -> None:
        """A resumable step checkpoint (weights, optimizer, schedule, steps done) at `path`; every rank calls it."""
        save_train_state(path, source, self.model, self.opt,
                         {"kind": "pretrain", "steps_done": self.steps_done, "scheduler": self.sched.state_dict()},
                         self.env)

    def _prepare(self, examples: list[TrainExample]) -> list[TrainExample]:
        if self.cfg.max_seq_len is None:
            return examples
        return [w for i, ex in enumerate(examples) for w in split_long(ex, self.cfg.max_seq_len, f"example {i}")]

    @torch.no_grad()
    def evaluate(self, examples: list[TrainExample]) -> float:
        """Mean next-token cross-entropy over every target of `examples` (exp of it: the perplexity)."""
        examples = [ex for ex in self._prepare(examples) if ex.num_targets]
        if not examples:
            raise ValueError("Pretrainer.evaluate: no example has a target token")
        was_training = self.model.training
        self.model.eval()
        totals = [0.0, 0]

        def run(_: int, batch: PackedBatch, weight: float) -> None:
            with self._autocast():
                loss_sum, n = next_token_loss(self.model, batch, self.cfg.chunk_rows)
            if weight:
                totals[0] += loss_sum.item()
                totals[1] += n

        mine = self.env.shard(examples)
        batches = [pack(g) for g in token_budget_batches(mine, self.cfg.max_tokens_per_batch)]
        lock_step_packed(self.env, self.model, batches, run)
        _release_images(batches)
        self.model.train(was_training)
        return self.env.all_sum(totals[0]) / self.env.all_sum(totals[1])

    def fit(self, examples: list[TrainExample], on_step: Callable[[StepLog], None] | None = None,
            resume=None, eval_examples: list[TrainExample] | None = None) -> list[StepLog]:
        """Train over `examples` for cfg.epochs (or cfg.max_steps); returns one log per optimizer step.
        resume: a step checkpoint (`save_state`) of an earlier run of the same data and config, at any world
        size: training continues at the next step, with the same batches and schedule as an uninterrupted run."""
        if not examples:
            raise ValueError("Pretrainer.fit: no training examples")
        # An example without targets (an image with an empty caption, a one-token text) adds nothing to the loss.
        prepared = self._prepare(examples)
        usable = [ex for ex in prepared if ex.num_targets]
        if not usable:
            raise ValueError(f"Pretrainer.fit: none of the {len(examples)} examples has a target token")
        if len(usable) < len(prepared):
            warnings.warn(f"Pretrainer.fit: skipped {len(prepared) - len(usable)} example(s) without target tokens")
        micro = self._micro_batches(usable)
        steps = -(-len(micro) // self.cfg.grad_accum)
        if self.cfg.max_steps is not None:
            steps = min(steps, self.cfg.max_steps)
        self.opt, self.sched = build_optimizer(self.model, self.cfg.optim, steps)
        self.steps_done = 0
        if resume is not None:
            self._load_state(resume, steps)
        self.model.train()
        logs = []
        for step in range(self.steps_done, steps):
            group = micro[step * self.cfg.grad_accum:(step + 1) * self.cfg.grad_accum]
            logs.append(self._step(step + 1, group, self.opt, self.sched))
            self.steps_done = step + 1
            every = self.cfg.eval_every
            if eval_examples and (self.steps_done == steps or (every and self.steps_done % every == 0)):
                logs[-1].eval_loss = self.evaluate(eval_examples)
            if on_step is not None:
                on_step(logs[-1])
        self.model.eval()
        return logs

    def _load_state(self, path, steps: int) -> None:
        state = read_train_state(path)
        if state.get("kind") != "pretrain":
            raise ValueError(f"resume {path}: not a pre-training state (kind {state.get('kind')!r})")
        if not 0 <= state["steps_done"] <= steps:
            raise ValueError(f"resume {path}: the state is at step {state['steps_done']}, this run has {steps} steps "
                             f"(resume with the same data and config)")
        load_train_state(path, self.model, self.opt)
        self.sched.load_state_dict(state["scheduler"])
        self.steps_done = state["steps_done"]

    def _step(self, step: int, group: list[list[TrainExample]], opt, sched) -> StepLog:
        t0 = time.perf_counter()
        targets = sum(ex.num_targets for g in group for ex in g)  # the whole step's, on every rank
        if self.env.is_distributed:
            mine = self.env.shard([ex for g in group for ex in g])
            group = list(token_budget_batches(mine, self.cfg.max_tokens_per_batch))
        batches = [pack(g) for g in group]
        # FSDP averages gradients over the ranks; scaling by world_size makes them the one-process sum.
        world = float(self.env.world_size)
        total = [0.0]

        def run(_: int, batch: PackedBatch, weight: float) -> None:
            with self._autocast():
                loss_sum, _ = next_token_loss(self.model, batch, self.cfg.chunk_rows)
            (loss_sum * (world * weight) / targets).backward()
            total[0] += loss_sum.item() * weight

        lock_step_packed(self.env, self.model, batches, run)
        _release_images(batches)
        lr = opt.param_groups[0]["lr"]
        norm = clip_and_step(self.model, opt, sched, self.cfg.optim.max_grad_norm)
        tokens = self.env.all_sum(float(sum(len(b.input_ids) for b in batches)))
        return StepLog(step, self.env.all_sum(total[0]) / targets, lr, norm, int(tokens), targets,
                       time.perf_counter() - t0)

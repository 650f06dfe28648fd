"""AdamW with decoupled weight decay on matrices only, and a linear-warmup cosine learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class OptimConfig:
    lr: float = 1e-5
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    warmup_steps: int = 0
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    # Parameter-name prefix -> multiplier of lr (and of the whole schedule) for the parameters under it, e.g.
    # {"vision_model.": 0.3}: a pre-trained vision tower moves more slowly than the decoder that learns to read it,
    # as VLM recipes train their ViT at a fraction of the LLM's rate. The longest matching prefix wins.
    lr_scales: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("lr", "eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"OptimConfig.{name} = {getattr(self, name)!r}: must be > 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"OptimConfig.min_lr_ratio = {self.min_lr_ratio!r}: must be in [0, 1]")
        if self.warmup_steps < 0 or self.weight_decay < 0:
            raise ValueError("OptimConfig.warmup_steps and weight_decay must be >= 0")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"OptimConfig.max_grad_norm = {self.max_grad_norm!r}: must be > 0 or None")
        bad = {k: v for k, v in self.lr_scales.items() if not (isinstance(v, (int, float)) and v > 0)}
        if bad:
            raise ValueError(f"OptimConfig.lr_scales: {bad!r}: each multiplier must be a number > 0")

    def scale_of(self, name: str) -> float:
        """The lr multiplier of the parameter called `name`."""
        hits = [p for p in self.lr_scales if name.startswith(p)]
        return float(self.lr_scales[max(hits, key=len)]) if hits else 1.0


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based): linear warm-up to 1, then a half cosine
    down to min_ratio at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: OptimConfig, total_steps: int
                    ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """Weight decay on parameters of two or more dimensions (matrices, embeddings), none on norms and biases
    (nanoGPT's rule); only parameters that require grad; cfg.lr_scales gives some of them their own rate (the
    groups at the base rate come first, so param_groups[0]["lr"] is the run's lr)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("build_optimizer: the model has no trainable parameters")
    scale_of = {n: cfg.scale_of(n) for n, _ in named}
    groups = []
    for scale in sorted(set(scale_of.values()), key=lambda s: (s != 1.0, s)):
        mine = [p for n, p in named if scale_of[n] == scale]
        groups += [{"params": [p for p in mine if p.dim() >= 2], "weight_decay": cfg.weight_decay, "lr": cfg.lr * scale},
                   {"params": [p for p in mine if p.dim() < 2], "weight_decay": 0.0, "lr": cfg.lr * scale}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, cfg.warmup_steps, total_steps, cfg.min_lr_ratio))
    return opt, sched


def clip_and_step(model: nn.Module, opt: torch.optim.Optimizer, sched, max_grad_norm: float | None) -> float:
    """Clip (if asked), step, advance the schedule, zero the grads; returns the gradient norm before clipping.
    A non-finite norm skips the update (weights and schedule stay as they were) and is returned as is."""
    params = [p for p in model.parameters() if p.grad is not None]
    total = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm is not None else math.inf)
    # Over a sharded model's gradients the norm is a DTensor (already reduced over the ranks).
    norm = float(total.full_tensor() if hasattr(total, "full_tensor") else total)
    if math.isfinite(norm):
        opt.step()
        sched.step()
    opt.zero_grad(set_to_none=True)
    return norm

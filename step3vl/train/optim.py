"""AdamW with decoupled weight decay on matrices only, and a linear-warmup cosine learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

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
    (nanoGPT's rule); only parameters that require grad."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("build_optimizer: the model has no trainable parameters")
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
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

"""Vision-encoder pre-training: the vision tower and projector trained alone to name labelled attributes of
pictures, before the decoder ever reads them — the role the Perception Encoder's own pre-training plays for
STEP3-VL, whose ViT arrives already able to see.

Why a separate stage: through an untrained decoder the image tokens are read about evenly (uniform attention
is a mean over tokens), and an attribute that lives in one region of the picture (a shape's outline) does not
survive that average, so next-token training never sends the tower a gradient about it (bench/RESULTS.md, "Why
the shapes model does not see kinds"). Here each label head reads the *max* over the image tokens (the
embeddings the decoder will see, after the projector), so the token that holds the attribute gets the gradient.

The heads are discarded; the checkpoint written is the whole model, its decoder untouched.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from step3vl.model.vlm import Step3VLForCausalLM
from step3vl.train.checkpoint import load_train_state, read_train_state, save_train_state
from step3vl.train.optim import OptimConfig, build_optimizer, clip_and_step
from step3vl.train.pretrain import single_process

# step -> (pixels [B, 3, S, S] of global views, {label name: class indices [B]})
VisionBatches = Callable[[int], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class VisionPretrainConfig:
    labels: dict[str, int]  # label name -> number of classes (one linear head each)
    steps: int
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, weight_decay=0.0, warmup_steps=20))
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.labels or any(n < 2 for n in self.labels.values()):
            raise ValueError(f"VisionPretrainConfig.labels = {self.labels!r}: name at least one label of >= 2 classes")
        if self.steps < 1:
            raise ValueError(f"VisionPretrainConfig.steps = {self.steps}: must be >= 1")


@dataclass
class VisionStepLog:
    step: int
    loss: float
    lr: float
    grad_norm: float
    accuracy: dict[str, float]  # per label, on this step's batch (fresh pictures: a held-out figure as it comes)
    seconds: float


class _Tower(nn.Module):
    """The parts this stage trains: the vision tower, the projector, and the throw-away label heads."""

    def __init__(self, model: Step3VLForCausalLM, labels: dict[str, int]):
        super().__init__()
        self.vision_model = model.vision_model
        self.vit_large_projector = model.vit_large_projector
        self.heads = nn.ModuleDict({name: nn.Linear(model.cfg.text.hidden_size, n) for name, n in labels.items()})

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens = self.vit_large_projector(self.vision_model(pixels))  # [B, T, hidden]: what the decoder reads
        pooled = tokens.amax(1)
        return {name: head(pooled) for name, head in self.heads.items()}


class VisionPretrainer:
    """One process (the stage is small: a tower of a few million parameters, minutes on a CPU)."""

    def __init__(self, model: Step3VLForCausalLM, cfg: VisionPretrainConfig):
        if model.cfg.vision is None:
            raise ValueError("VisionPretrainer: the checkpoint has no vision encoder")
        self.model, self.cfg = model, cfg
        # Loaded models come frozen for inference; only the tower trains here, the decoder waits for its stage.
        model.requires_grad_(False)
        model.vision_model.requires_grad_(True)
        model.vit_large_projector.requires_grad_(True)
        torch.manual_seed(cfg.seed)  # the heads' initialisation
        self.tower = _Tower(model, cfg.labels).to(model.device)
        self.env = single_process(model)
        self.opt, self.sched = build_optimizer(self.tower, cfg.optim, cfg.steps)
        self.steps_done = 0

    def save_state(self, path, source) -> None:
        save_train_state(path, source, self.tower, self.opt,
                         {"kind": "vision", "steps_done": self.steps_done, "scheduler": self.sched.state_dict()},
                         self.env)

    def load_state(self, path) -> None:
        state = read_train_state(path)
        if state.get("kind") != "vision":
            raise ValueError(f"resume {path}: not a vision pre-training state (kind {state.get('kind')!r})")
        if not 0 <= state["steps_done"] <= self.cfg.steps:
            raise ValueError(f"resume {path}: the state is at step {state['steps_done']}, this run has "
                             f"{self.cfg.steps} steps (resume with the same config)")
        load_train_state(path, self.tower, self.opt)
        self.sched.load_state_dict(state["scheduler"])
        self.steps_done = state["steps_done"]

    def fit(self, batches: VisionBatches, on_step: Callable[[VisionStepLog], None] | None = None
            ) -> list[VisionStepLog]:
        """Train from the step after `steps_done` to cfg.steps; `batches(step)` gives step `step`'s pictures and
        labels (a pure function of the step, so a resumed run sees the batches an uninterrupted one would)."""
        self.tower.train()
        logs = []
        for step in range(self.steps_done, self.cfg.steps):
            logs.append(self._step(step + 1, *batches(step)))
            self.steps_done = step + 1
            if on_step is not None:
                on_step(logs[-1])
        self.tower.eval()
        return logs

    def _step(self, step: int, pixels: torch.Tensor, labels: dict[str, torch.Tensor]) -> VisionStepLog:
        t0 = time.perf_counter()
        unknown = set(labels) - set(self.cfg.labels)
        if unknown:
            raise ValueError(f"vision batch of step {step}: labels {sorted(unknown)} have no head "
                             f"(the config names {sorted(self.cfg.labels)})")
        logits = self.tower(pixels.to(self.model.device, self.model.dtype))
        losses, accuracy = [], {}
        for name, y in labels.items():
            y = y.to(self.model.device)
            losses.append(F.cross_entropy(logits[name].float(), y))
            accuracy[name] = float((logits[name].argmax(-1) == y).float().mean())
        loss = torch.stack(losses).sum()
        loss.backward()
        lr = self.opt.param_groups[0]["lr"]
        norm = clip_and_step(self.tower, self.opt, self.sched, self.cfg.optim.max_grad_norm)
        return VisionStepLog(step, loss.item(), lr, norm, accuracy, time.perf_counter() - t0)

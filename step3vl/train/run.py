"""Checkpoint directory in, checkpoint directory out: the training loops with their loading and saving glue
(what the CLI's `train` and `rl` commands call; usable from Python as they are)."""

from __future__ import annotations

import json
import random
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from step3vl.loader import load_model
from step3vl.processor import Step3VLProcessor
from step3vl.saver import save_checkpoint
from step3vl.train.data import load_examples, read_jsonl
from step3vl.train.pretrain import Pretrainer, PretrainConfig
from step3vl.train.rewards import math_reward
from step3vl.train.rl import RLConfig, RLPrompt, RLTrainer


def _device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


class _JsonlLog:
    """One JSON object per step, appended as it happens (a crash keeps the steps done so far)."""

    def __init__(self, path: str | Path | None):
        self.file = open(path, "a", encoding="utf-8") if path else None

    def __call__(self, log: Any) -> None:
        if self.file:
            self.file.write(json.dumps(asdict(log)) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


def _saver(ckpt: str | Path, out: str | Path, every: int | None, dtype: torch.dtype):
    """on_step(step, model): a checkpoint `<out>-step<k>` every `every` steps (beside the final one at out)."""
    out = Path(out)

    def save(step: int, model) -> None:
        if every and step % every == 0:
            save_checkpoint(model, out.with_name(f"{out.name}-step{step}"), ckpt, dtype=dtype)
    return save


def pretrain(ckpt: str | Path, data: str | Path, out: str | Path, cfg: PretrainConfig | None = None,
             device: str | None = None, log_path: str | Path | None = None, progress: bool = True,
             save_every: int | None = None, save_dtype: torch.dtype = torch.bfloat16) -> list:
    """Next-token training of the checkpoint at `ckpt` on the JSONL examples in `data` (see data.py); the
    result is written to `out` as a checkpoint (official format, `save_dtype`). Returns the step logs."""
    cfg = cfg or PretrainConfig()
    processor = Step3VLProcessor.from_pretrained(ckpt)
    examples = load_examples(processor, data)
    model = load_model(ckpt, dtype=torch.float32, device=_device(device))
    log = _JsonlLog(log_path)
    save = _saver(ckpt, out, save_every, save_dtype)
    bar = tqdm(desc="train", unit="step", disable=not progress)

    def on_step(s) -> None:
        log(s)
        save(s.step, model)
        bar.update(1)
        bar.set_postfix(loss=f"{s.loss:.4f}", lr=f"{s.lr:.2e}", tok_s=f"{s.tokens / max(s.seconds, 1e-9):.0f}")

    try:
        logs = Pretrainer(model, cfg).fit(examples, on_step)
    finally:
        bar.close()
        log.close()
    save_checkpoint(model, out, ckpt, dtype=save_dtype)
    return logs


def read_rl_prompts(path: str | Path) -> list[RLPrompt]:
    """Problems in the official PaCoRe format ({"id", "messages", "ground_truth"}) as RL prompts."""
    prompts = []
    for n, rec in read_jsonl(path):
        if not isinstance(rec, dict) or not isinstance(rec.get("messages"), list) or rec.get("ground_truth") is None:
            raise ValueError(f"{path}:{n}: a problem needs 'messages' (a list) and a 'ground_truth'")
        prompts.append(RLPrompt(rec["messages"], rec["ground_truth"], id=str(rec.get("id", f"line{n}"))))
    return prompts


class Cycle:
    """Items in passes, each pass reshuffled (seeded): take(k) returns the next k."""

    def __init__(self, items: list, seed: int):
        if not items:
            raise ValueError("nothing to draw from")
        self.items, self.rng, self.queue = items, random.Random(seed), []

    def take(self, k: int) -> list:
        while len(self.queue) < k:
            fresh = list(self.items)
            self.rng.shuffle(fresh)
            self.queue += fresh
        out, self.queue = self.queue[:k], self.queue[k:]
        return out


def reinforce(ckpt: str | Path, batches: Callable[[int], list[RLPrompt]], out: str | Path, steps: int,
              cfg: RLConfig | None = None, reward_fn: Callable[[str, Any], float] = math_reward,
              device: str | None = None, engine_kwargs: dict | None = None, log_path: str | Path | None = None,
              progress: bool = True, save_every: int | None = None, save_dtype: torch.dtype = torch.bfloat16) -> list:
    """`steps` RL iterations; `batches(step)` gives the prompts of iteration `step` (0-based), e.g.
    `Cycle(prompts, seed).take` bound to a batch size, or fresh PaCoRe synthesis episodes each step. The policy is
    written to `out` as a checkpoint. Returns the step logs."""
    from step3vl.engine import LLM

    cfg = cfg or RLConfig(total_steps=steps)
    dev = _device(device)
    llm = LLM(ckpt, device=str(dev), **(engine_kwargs or {}))
    trainer = RLTrainer(load_model(ckpt, dtype=torch.float32, device=dev), llm, reward_fn, cfg)
    log = _JsonlLog(log_path)
    save = _saver(ckpt, out, save_every, save_dtype)
    logs = []
    try:
        for step in tqdm(range(steps), desc="rl", unit="step", disable=not progress):
            logs.append(trainer.step(batches(step)))
            log(logs[-1])
            save(logs[-1].step, trainer.model)
    finally:
        log.close()
    save_checkpoint(trainer.model, out, ckpt, dtype=save_dtype)
    return logs

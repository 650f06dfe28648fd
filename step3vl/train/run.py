"""Checkpoint directory in, checkpoint directory out: the training loops with their loading and saving glue
(what the CLI's `train` and `rl` commands call; usable from Python as they are)."""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from step3vl.distributed import DistEnv, init_distributed, launched_world_size
from step3vl.loader import load_model
from step3vl.processor import Step3VLProcessor
from step3vl.saver import save_checkpoint
from step3vl.train.checkpoint import STATE_FILE, read_train_state
from step3vl.train.data import load_examples, read_jsonl
from step3vl.train.pretrain import Pretrainer, PretrainConfig
from step3vl.train.rewards import math_reward
from step3vl.train.rl import RLConfig, RLPrompt, RLTrainer
from step3vl.train.vision import VisionBatches, VisionPretrainConfig, VisionPretrainer


class _JsonlLog:
    """One JSON object per step, appended as it happens (a crash keeps the steps done so far). A run resumed at
    step k first drops the lines of steps after k (logged by the interrupted run past its last save), so each
    step appears once."""

    def __init__(self, path: str | Path | None, resumed_at: int | None = None):
        if path and resumed_at is not None and Path(path).is_file():
            lines = Path(path).read_text(encoding="utf-8").splitlines(keepends=True)
            kept = [ln for ln in lines if ln.strip() and _logged_step(ln) <= resumed_at]
            tmp = Path(f"{path}.tmp")
            tmp.write_text("".join(kept), encoding="utf-8")
            tmp.replace(path)
        self.file = open(path, "a", encoding="utf-8") if path else None

    def __call__(self, log: Any) -> None:
        if self.file:
            self.file.write(json.dumps(asdict(log)) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


def _logged_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 1 << 62  # a line cut by the kill: the interrupted run's last, past any resume point


def _saver(out: str | Path, every: int | None, save_state: Callable[[Path], None], env: DistEnv,
           keep: int | None = None) -> Callable[[int], None]:
    """on_step(step): every `every` steps a resumable step checkpoint `<out>-step<k>` (checkpoint.py: DCP weights
    and optimizer, trainer state) written by `save_state(path)` on every rank; with `keep`, only the newest `keep`
    of them stay (older ones are deleted after the new one is complete)."""
    out = Path(out)

    def save(step: int) -> None:
        if every and step % every == 0:
            save_state(out.with_name(f"{out.name}-step{step}"))
            if keep and env.is_main:
                for old in step_checkpoints(out)[:-keep]:
                    shutil.rmtree(old, ignore_errors=True)
    return save


def step_checkpoints(out: str | Path) -> list[Path]:
    """The complete `<out>-step<k>` checkpoints of a run, oldest first."""
    out = Path(out)
    found = []
    for p in out.parent.glob(f"{out.name}-step*"):
        k = p.name[len(out.name) + len("-step"):]
        if k.isdigit() and (p / "config.json").is_file() and (p / STATE_FILE).is_file():
            found.append((int(k), p))
    return [p for _, p in sorted(found)]


def pretrain(ckpt: str | Path, data: str | Path, out: str | Path, cfg: PretrainConfig | None = None,
             device: str | None = None, log_path: str | Path | None = None, progress: bool = True,
             save_every: int | None = None, save_dtype: torch.dtype = torch.bfloat16,
             resume: str | Path | None = None, eval_data: str | Path | None = None, keep_saves: int | None = None,
             env: DistEnv | None = None) -> list:
    """Next-token training of the checkpoint at `ckpt` on the JSONL examples in `data` (see data.py); the
    result is written to `out` as a checkpoint (official format, `save_dtype`). resume: a `<out>-step<k>`
    checkpoint of an earlier run with the same data and config (at any world size). eval_data: held-out JSONL
    examples, evaluated every cfg.eval_every steps and at the end (`eval_loss` in the step logs). keep_saves: how
    many of the newest `--save-every` checkpoints to keep (None: all). env: the run's ranks (default: from
    torchrun's environment; one process without it). Returns the step logs."""
    cfg = cfg or PretrainConfig()
    env = env or init_distributed(device)
    processor = Step3VLProcessor.from_pretrained(ckpt)
    examples = load_examples(processor, data)
    held_out = load_examples(processor, eval_data) if eval_data else None
    resumed_at = read_train_state(resume)["steps_done"] if resume else None
    model = load_model(ckpt, dtype=torch.float32, device=env.device)
    trainer = Pretrainer(model, cfg, env)
    log = _JsonlLog(log_path if env.is_main else None, resumed_at)
    save = _saver(out, save_every, lambda p: trainer.save_state(p, ckpt), env, keep=keep_saves)
    bar = tqdm(desc="train", unit="step", disable=not progress or not env.is_main)

    def on_step(s) -> None:
        log(s)
        save(s.step)
        bar.update(1)
        shown = {"loss": f"{s.loss:.4f}", "lr": f"{s.lr:.2e}", "tok_s": f"{s.tokens / max(s.seconds, 1e-9):.0f}"}
        if s.eval_loss is not None:
            shown["eval_loss"] = f"{s.eval_loss:.4f}"
        bar.set_postfix(shown)

    try:
        logs = trainer.fit(examples, on_step, resume=resume, eval_examples=held_out)
    finally:
        bar.close()
        log.close()
    save_checkpoint(model, out, ckpt, dtype=save_dtype)
    env.barrier()
    return logs


def pretrain_vision(ckpt: str | Path, batches: VisionBatches, out: str | Path, cfg: VisionPretrainConfig,
                    device: str | None = None, log_path: str | Path | None = None, progress: bool = True,
                    save_every: int | None = None, save_dtype: torch.dtype = torch.bfloat16,
                    resume: str | Path | None = None, keep_saves: int | None = None) -> list:
    """Vision-encoder pre-training (vision.py) of the checkpoint at `ckpt`: `batches(step)` gives each step's
    global views and labels; the whole model is written to `out` (the label heads are not part of it). resume: a
    `<out>-step<k>` checkpoint of an earlier run with the same batches and config. Returns the step logs."""
    if launched_world_size() > 1:
        raise ValueError("pretrain_vision runs in one process (a tower of a few million parameters, minutes); "
                         "run it without torchrun, then the next stages with it")
    model = load_model(ckpt, dtype=torch.float32, device=init_distributed(device).device)
    trainer = VisionPretrainer(model, cfg)
    resumed_at = None
    if resume:
        trainer.load_state(resume)
        resumed_at = trainer.steps_done
    log = _JsonlLog(log_path, resumed_at)
    save = _saver(out, save_every, lambda p: trainer.save_state(p, ckpt), trainer.env, keep=keep_saves)
    bar = tqdm(desc="vision", unit="step", total=cfg.steps, initial=trainer.steps_done, disable=not progress)

    def on_step(s) -> None:
        log(s)
        save(s.step)
        bar.update(1)
        bar.set_postfix({"loss": f"{s.loss:.3f}", **{k: f"{v:.2f}" for k, v in s.accuracy.items()}})

    try:
        logs = trainer.fit(batches, on_step)
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


class PromptBatches:
    """`batch_size` prompts per step, in passes over `prompts`, each pass reshuffled (seeded); resumable."""

    def __init__(self, prompts: list, batch_size: int, seed: int):
        if not prompts:
            raise ValueError("no prompts to draw from")
        if batch_size < 1:
            raise ValueError(f"batch_size {batch_size}: must be >= 1")
        self.prompts, self.batch_size = prompts, batch_size
        self.rng, self.queue = random.Random(seed), []

    def take(self, k: int) -> list:
        return [self.prompts[i] for i in self.take_ids(k)]

    def take_ids(self, k: int) -> list[int]:
        """The next k indices; no index twice in one draw while k <= len(prompts) (a draw that straddles two
        passes leaves the repeats at the front of the queue for the next draw)."""
        n = len(self.prompts)
        out, deferred = [], []
        while len(out) < k:
            if not self.queue:
                self.queue = list(range(n))
                self.rng.shuffle(self.queue)
            i = self.queue.pop(0)
            if i in out and len(set(out)) < n:
                deferred.append(i)
            else:
                out.append(i)
        self.queue = deferred + self.queue
        return out

    def put_back(self, ids: list[int]) -> None:
        """Return drawn but unused indices to the front of the queue, in order."""
        self.queue = list(ids) + self.queue

    def __call__(self, step: int) -> list:
        return self.take(self.batch_size)

    def state_dict(self) -> dict:
        version, internal, gauss = self.rng.getstate()
        return {"rng": [version, list(internal), gauss], "queue": list(self.queue)}

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.queue = list(state["queue"])


def reinforce(ckpt: str | Path, batches: Callable[[int], list[RLPrompt]], out: str | Path, steps: int,
              cfg: RLConfig | None = None, reward_fn: Callable[[str, Any], float] = math_reward,
              device: str | None = None, engine_kwargs: dict | None = None, log_path: str | Path | None = None,
              progress: bool = True, save_every: int | None = None, save_dtype: torch.dtype = torch.bfloat16,
              resume: str | Path | None = None, eval_prompts: list[RLPrompt] | None = None,
              eval_every: int | None = None, eval_samples: int = 1, keep_saves: int | None = None,
              env: DistEnv | None = None) -> list:
    """RL iterations up to `steps` in all; `batches(step)` gives the prompts of iteration `step` (0-based), e.g. a
    `PromptBatches`, or fresh PaCoRe synthesis episodes each step (an object with state_dict/load_state_dict
    is saved and restored with the trainer; under N ranks every rank draws the same batch and samples its share).
    The policy is written to `out` as a checkpoint. resume: a `<out>-step<k>` checkpoint of an earlier run (any
    world size). eval_prompts: held-out prompts whose mean reward is measured every `eval_every` steps and after
    the last (`eval_reward` in the logs). keep_saves: how many of the newest step checkpoints to keep (None: all).
    env: the run's ranks (default: from torchrun's environment). Returns the step logs of this run."""
    from step3vl.engine import LLM

    cfg = cfg or RLConfig(total_steps=steps)
    env = env or init_distributed(device)
    llm = LLM(ckpt, device=str(env.device), **(engine_kwargs or {}))
    # The KL reference is the run's starting checkpoint, also when resuming.
    ref = load_model(ckpt, dtype=torch.float32, device=env.device) if cfg.kl_coef > 0 else None
    trainer = RLTrainer(load_model(ckpt, dtype=torch.float32, device=env.device), llm, reward_fn, cfg,
                        ref_model=ref, env=env)
    if resume:
        state = trainer.load_state(resume)
        if "sampler" in state and hasattr(batches, "load_state_dict"):
            batches.load_state_dict(state["sampler"])
    log = _JsonlLog(log_path if env.is_main else None, trainer.steps_done if resume else None)

    def save_state(path: Path) -> None:
        sampler = {"sampler": batches.state_dict()} if hasattr(batches, "state_dict") else {}
        trainer.save_state(path, ckpt, sampler)

    save = _saver(out, save_every, save_state, env, keep=keep_saves)
    logs = []
    try:
        for step in tqdm(range(trainer.steps_done, steps), desc="rl", unit="step", disable=not progress or not env.is_main):
            logs.append(trainer.step(batches(step)))
            done = logs[-1].step
            if eval_prompts and (done == steps or (eval_every and done % eval_every == 0)):
                logs[-1].eval_reward = trainer.evaluate(eval_prompts, eval_samples)
            log(logs[-1])
            save(logs[-1].step)
    finally:
        log.close()
    save_checkpoint(trainer.model, out, ckpt, dtype=save_dtype)
    env.barrier()
    return logs

"""The `shapes` recipe: a STEP3-VL-architecture model trained from scratch to see and reason on the `shapes`
task, by this project's own loops, then evaluated as the PaCoRe and STEP3-VL reports evaluate.

    step3vl recipe shapes --out DIR [--seed 0] [--stages init,pretrain,rl,pools,synthesis,eval]

Stages (each a use of the public training API; each resumable, each skipped once its output exists):
  init       the `shapes` preset of make_tiny_checkpoint, with a tokenizer trained on the task's texts;
  vision     vision-encoder pre-training (step3vl.train.run.pretrain_vision): the tower and projector learn to
             name the kind and colour of a lone shape, as the real model's ViT arrives pre-trained; through an
             untrained decoder shape kinds never reach the tower (bench/RESULTS.md);
  pretrain   image-text pre-training (step3vl.train.run.pretrain): captions, questions answered with
             reasoning traces, synthesis prompts over synthetic references; every parameter trains;
  rl         GRPO with outcome rewards (step3vl.train.run.reinforce / RLTrainer), rollouts through the engine,
             rewards from the task's checker;
  pools      PaCoRe runs of the RL model on training problems: its own cached messages (the reference pools);
  synthesis_sft  fine-tuning (the pre-training loop) on synthesis prompts over those pools, answered with a trace
             that tallies the references, reads the picture with one of the model's own readings and closes with
             the canonical answer, mixed with as many plain questions;
  synthesis  RL on PaCoRe synthesis episodes (pacore.episodes.EpisodeBatches over those pools, the official
             template, mostly-right instances filtered out);
  eval       greedy / single / self-consistency / PaCoRe on the held-out problems (pacore.recipes.evaluate)
             for the checkpoints after rl and after synthesis.

Everything lives under DIR; a stage interrupted at any point resumes from its last saved step when the same
command runs again.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from step3vl.durable import replace_dir
from step3vl.tasks.shapes import HELD_OUT_SEEDS, shapes_reward
from step3vl.tools.make_tiny_checkpoint import make_tiny_checkpoint
from step3vl.train.optim import OptimConfig
from step3vl.train.pretrain import PretrainConfig
from step3vl.train.rl import RLConfig
from step3vl.train.run import PromptBatches, pretrain, pretrain_vision, reinforce, step_checkpoints
from step3vl.train.vision import VisionPretrainConfig

from step3vl_pacore.recipes import shapes_data as data

STAGES = ("init", "vision", "pretrain", "rl", "pools", "synthesis_sft", "synthesis", "eval")
EVAL_LOSS_SEEDS = 500  # held-out-loss problems start here: neither training (>= 1e6) nor evaluation (0-499) seeds


@dataclass
class ShapesRecipe:
    out: Path
    seed: int = 0
    preset: str = "shapes"
    device: str | None = None
    # vision-encoder pre-training (single-shape pictures, kind and colour heads on the max over image tokens)
    vision_steps: int = 1500
    vision_batch: int = 32
    vision_lr: float = 1e-3
    # pre-training
    pretrain_examples: int = 60_000
    # Share of pre-training problems whose pictures have one or two shapes (data.pretrain_records): without them
    # the vision tower never learned shape kinds (bench/RESULTS.md).
    few_shapes_fraction: float = 0.25
    pretrain_lr: float = 1e-3
    # the vision tower's share of pretrain_lr: it arrives trained by the vision stage, and at the decoder's full
    # rate the noise of an untrained reader's gradients would wash out what it learned (VLM recipes do the same)
    pretrain_vision_lr_scale: float = 0.3
    pretrain_batch_tokens: int = 4096
    pretrain_warmup: int = 50
    # RL with outcome rewards
    rl_steps: int = 100
    rl_problems: int = 16  # per step
    rl_group: int = 8
    rl_lr: float = 3e-5
    max_tokens: int = 128  # per trajectory (a trace is 20-70 tokens)
    # reference pools and synthesis RL
    pool_problems: int = 600
    pool_rounds: list[int] = field(default_factory=lambda: [24])
    # Reference sets per pool problem in a synthesis fine-tuning before the synthesis RL; 0 (the default): none,
    # the synthesis RL starts from the GRPO checkpoint, as PaCoRe's own training does. Both fine-tunings tried
    # lowered PaCoRe's accuracy (bench/RESULTS.md).
    synthesis_sft_draws: int = 0
    synthesis_sft_lr: float = 3e-4
    # "own": the synthesis traces read the picture with the model's own (fallible) readings from the pools and
    # close with the canonical answer; "truth": with the true reading (which settles the answer alone, so the
    # model learned to ignore the references: bench/RESULTS.md).
    synthesis_sft_readings: str = "own"
    synthesis_steps: int = 60
    synthesis_problems: int = 16  # episodes per step
    synthesis_group: int = 8
    synthesis_lr: float = 3e-5
    # evaluation
    eval_problems: int = 500
    eval_samples: int = 16
    save_every: int = 25
    progress: bool = True

    @classmethod
    def toy(cls, out: Path, **kw) -> "ShapesRecipe":
        """Every stage at toy size: the recipe's smoke test (well under a minute)."""
        sizes = dict(preset="shapes-tiny", vision_steps=3, vision_batch=4, pretrain_examples=24,
                     pretrain_batch_tokens=512, pretrain_warmup=1,
                     rl_steps=2, rl_problems=2, rl_group=2, max_tokens=12, pool_problems=4, pool_rounds=[3],
                     synthesis_steps=2, synthesis_problems=2, synthesis_group=2, eval_problems=3, eval_samples=4,
                     save_every=1, progress=False)
        return cls(out=Path(out), **{**sizes, **kw})

    # -- layout under `out` --------------------------------------------------------------------------

    def path(self, name: str) -> Path:
        return Path(self.out) / name

    @property
    def images(self) -> Path:
        return self.path("images")

    def engine_kwargs(self) -> dict:
        return dict(kv_cache_memory="512MiB", seed=self.seed)


# -- helpers ----------------------------------------------------------------------------------------------


def _done(path: Path) -> bool:
    return (path / "config.json").is_file()


def _latest_step(out: Path) -> Path | None:
    """The newest complete `<out>-step<k>` checkpoint a stage saved."""
    steps = step_checkpoints(out)
    return steps[-1] if steps else None


def _prune_steps(out: Path) -> None:
    """Drop a finished stage's step checkpoints (half-written `.tmp` ones included)."""
    for p in out.parent.glob(f"{out.name}-step*"):
        shutil.rmtree(p, ignore_errors=True)


def _timed(recipe: ShapesRecipe, stage: str, fn) -> None:
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    if seconds < 1.0:  # skipped: its output was there already
        return
    with open(recipe.path("timings.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps({"stage": stage, "seconds": round(seconds, 1),
                            "threads": torch.get_num_threads(), "when": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")


def _log_path(recipe: ShapesRecipe, stage: str) -> Path:
    return recipe.path(f"{stage}.log.jsonl")


def _resume_point(recipe: ShapesRecipe, stage: str, out: Path) -> Path | None:
    """The stage's newest step checkpoint; a stage starting afresh starts its log afresh too (a resumed one
    has the lines past its resume point dropped by the training loop)."""
    resume = _latest_step(out)
    if resume is None:
        _log_path(recipe, stage).unlink(missing_ok=True)
    return resume


# -- stages -----------------------------------------------------------------------------------------------


def stage_init(recipe: ShapesRecipe) -> None:
    if _done(recipe.path("init")):
        return
    corpus = data.tokenizer_corpus(3000 if recipe.preset == "shapes" else 50)
    tmp = recipe.path("init.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    make_tiny_checkpoint(tmp, recipe.preset, seed=recipe.seed, shards=1, corpus=corpus, for_training=True)
    tmp.rename(recipe.path("init"))


def stage_vision(recipe: ShapesRecipe) -> None:
    from step3vl.processor import Step3VLProcessor

    out = recipe.path("vision")
    if _done(out):
        return
    spec = Step3VLProcessor.from_pretrained(recipe.path("init")).spec
    cfg = VisionPretrainConfig(labels=dict(data.VISION_LABELS), steps=recipe.vision_steps, seed=recipe.seed,
                               optim=OptimConfig(lr=recipe.vision_lr, weight_decay=0.0,
                                                 warmup_steps=min(20, recipe.vision_steps)))
    resume = _resume_point(recipe, "vision", out)
    pretrain_vision(recipe.path("init"), lambda step: data.vision_batch(step, recipe.vision_batch, spec), out, cfg,
                    device=recipe.device, log_path=_log_path(recipe, "vision"), progress=recipe.progress,
                    save_every=recipe.save_every, resume=resume, keep_saves=1)
    _prune_steps(out)


def stage_pretrain(recipe: ShapesRecipe) -> None:
    out = recipe.path("pretrain")
    if _done(out):
        return
    recipe.images.mkdir(parents=True, exist_ok=True)
    train = data.write_jsonl(recipe.path("pretrain.jsonl"), data.pretrain_records(recipe.images, recipe.pretrain_examples,
                                                                         few_shapes_fraction=recipe.few_shapes_fraction))
    held = max(8, recipe.eval_problems // 2)
    held_out = data.write_jsonl(recipe.path("pretrain_eval.jsonl"),
                                [data.answered_record(data.generate(s), recipe.images)
                                 for s in range(EVAL_LOSS_SEEDS, EVAL_LOSS_SEEDS + held)])
    cfg = PretrainConfig(optim=OptimConfig(lr=recipe.pretrain_lr, warmup_steps=recipe.pretrain_warmup,
                                           weight_decay=0.1,
                                           lr_scales={"vision_model.": recipe.pretrain_vision_lr_scale}),
                         max_tokens_per_batch=recipe.pretrain_batch_tokens, seed=recipe.seed, train_vision=True,
                         eval_every=100)
    resume = _resume_point(recipe, "pretrain", out)
    pretrain(recipe.path("vision"), train, out, cfg, device=recipe.device, log_path=_log_path(recipe, "pretrain"),
             progress=recipe.progress, save_every=recipe.save_every, resume=resume, eval_data=held_out, keep_saves=1)
    _prune_steps(out)


def _rl_config(recipe: ShapesRecipe, steps: int, group: int, lr: float) -> RLConfig:
    return RLConfig(optim=OptimConfig(lr=lr, weight_decay=0.0, warmup_steps=min(5, steps)), total_steps=steps,
                    group_size=group, temperature=1.0, max_tokens=recipe.max_tokens, train_vision=True,
                    seed=recipe.seed, max_tokens_per_batch=8192)


def stage_rl(recipe: ShapesRecipe) -> None:
    out = recipe.path("rl")
    if _done(out):
        return
    prompts = data.rl_prompts(recipe.images, data.RL_SEEDS, recipe.rl_steps * recipe.rl_problems)
    held = data.rl_prompts(recipe.images, EVAL_LOSS_SEEDS, max(4, recipe.eval_problems // 5))
    batches = PromptBatches(prompts, recipe.rl_problems, recipe.seed)
    resume = _resume_point(recipe, "rl", out)
    reinforce(recipe.path("pretrain"), batches, out, recipe.rl_steps,
              _rl_config(recipe, recipe.rl_steps, recipe.rl_group, recipe.rl_lr), reward_fn=shapes_reward,
              device=recipe.device, engine_kwargs=recipe.engine_kwargs(), log_path=_log_path(recipe, "rl"),
              progress=recipe.progress, save_every=recipe.save_every, resume=resume, eval_prompts=held, keep_saves=1,
              eval_every=max(1, recipe.rl_steps // 4))
    _prune_steps(out)


def stage_pools(recipe: ShapesRecipe) -> None:
    """The RL model's own PaCoRe rollouts on training problems, cached as a batch-run output (resumable)."""
    from step3vl.engine import LLM
    from step3vl_pacore.batch import run_batch
    from step3vl_pacore.config import PaCoReConfig
    from step3vl_pacore.runner import PaCoRe

    done = recipe.path("pools.done")
    if done.is_file():
        return
    recipe.images.mkdir(parents=True, exist_ok=True)
    problems = [data.problem_record(data.generate(s), recipe.images)
                for s in range(data.POOL_SEEDS, data.POOL_SEEDS + recipe.pool_problems)]
    source = data.write_jsonl(recipe.path("pool_problems.jsonl"), problems)
    llm = LLM(recipe.path("rl"), device=recipe.device, **recipe.engine_kwargs())
    # "keep": a trajectory that never closes its reasoning passes its whole text on, as the official client does.
    cfg = PaCoReConfig(rounds=list(recipe.pool_rounds), max_tokens=recipe.max_tokens, seed=recipe.seed,
                       record_reasoning=True, max_concurrent_problems=64, unclosed_policy="keep")
    for _ in run_batch(PaCoRe(llm, cfg), source, recipe.path("pools.jsonl"), progress=recipe.progress):
        pass  # each record is appended as its problem completes (the batch runner's resume)
    done.write_text("ok\n")


def _pools(recipe: ShapesRecipe) -> tuple[list, dict[str, list[str]]]:
    from step3vl.train.data import read_jsonl
    from step3vl_pacore.episodes import pool_from_result
    from step3vl_pacore.problem import Problem

    pools = {rec["request_id"]: pool_from_result(rec) for _, rec in read_jsonl(recipe.path("pools.jsonl"))}
    problems = [Problem.from_record(rec, rec["id"]) for _, rec in read_jsonl(recipe.path("pool_problems.jsonl"))]
    return problems, pools


def _readings(recipe: ShapesRecipe) -> dict[str, list[str]] | None:
    from step3vl.train.data import read_jsonl

    if recipe.synthesis_sft_readings == "truth":
        return None
    if recipe.synthesis_sft_readings != "own":
        raise ValueError(f"synthesis_sft_readings = {recipe.synthesis_sft_readings!r}: 'own' or 'truth'")
    readings = {rec["request_id"]: data.pool_readings(rec) for _, rec in read_jsonl(recipe.path("pools.jsonl"))}
    if not any(readings.values()):
        # pools recorded without reasoning (an older run), or a model that never closes its reasoning (toy sizes)
        warnings.warn(f"{recipe.path('pools.jsonl')}: no trajectory has a reasoning to read with; the synthesis "
                      "traces use the true reading (to use the model's own, remove pools.jsonl and pools.done and "
                      "run the pools stage again)")
    return readings


def stage_synthesis_sft(recipe: ShapesRecipe) -> None:
    out = recipe.path("synthesis_sft")
    if _done(out) or not recipe.synthesis_sft_draws:
        return
    problems, pools = _pools(recipe)
    synthesis = data.synthesis_records([p.id for p in problems], pools, recipe.images, recipe.synthesis_sft_draws,
                                       recipe.seed, readings=_readings(recipe))
    plain = [data.answered_record(data.generate(s), recipe.images)
             for s in range(data.SFT_SEEDS, data.SFT_SEEDS + len(synthesis))]
    train = data.write_jsonl(recipe.path("synthesis_sft.jsonl"), synthesis + plain)
    cfg = PretrainConfig(optim=OptimConfig(lr=recipe.synthesis_sft_lr, warmup_steps=min(10, recipe.pretrain_warmup),
                                           weight_decay=0.1),
                         max_tokens_per_batch=recipe.pretrain_batch_tokens, seed=recipe.seed, train_vision=True)
    resume = _resume_point(recipe, "synthesis_sft", out)
    pretrain(recipe.path("rl"), train, out, cfg, device=recipe.device, log_path=_log_path(recipe, "synthesis_sft"),
             progress=recipe.progress, save_every=recipe.save_every, resume=resume, keep_saves=1)
    _prune_steps(out)


def stage_synthesis(recipe: ShapesRecipe) -> None:
    from step3vl_pacore.episodes import EpisodeBatches, EpisodeConfig

    out = recipe.path("synthesis")
    if _done(out):
        return
    problems, pools = _pools(recipe)
    episodes = EpisodeBatches(problems, pools, EpisodeConfig(min_refs=16, max_refs=24, seed=recipe.seed),
                              recipe.synthesis_problems, reward_fn=shapes_reward)
    resume = _resume_point(recipe, "synthesis", out)
    start = recipe.path("synthesis_sft" if recipe.synthesis_sft_draws else "rl")
    reinforce(start, episodes, out, recipe.synthesis_steps,
              _rl_config(recipe, recipe.synthesis_steps, recipe.synthesis_group, recipe.synthesis_lr),
              reward_fn=shapes_reward, device=recipe.device, engine_kwargs=recipe.engine_kwargs(),
              log_path=_log_path(recipe, "synthesis"), progress=recipe.progress, save_every=recipe.save_every,
              resume=resume, keep_saves=1)
    _prune_steps(out)


def stage_eval(recipe: ShapesRecipe) -> None:
    from step3vl_pacore.recipes.evaluate import evaluate_shapes, plot_evaluation

    seeds = list(HELD_OUT_SEEDS)[:recipe.eval_problems]
    results = {}
    for name in ("rl", "synthesis"):
        path = recipe.path(f"eval-{name}.json")
        if not path.is_file() and not _done(recipe.path(name)):
            continue  # a stage not trained yet (the eval stage runs again once it is)
        if not path.is_file():
            report = evaluate_shapes(recipe.path(name), seeds, samples=recipe.eval_samples,
                                     max_tokens=recipe.max_tokens, seed=recipe.seed, device=recipe.device,
                                     engine_kwargs=recipe.engine_kwargs(), progress=recipe.progress)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(report, indent=1))
            tmp.replace(path)
        results[name] = json.loads(path.read_text())
    plot_evaluation(results, recipe.path("eval.png"))


STAGE_FNS = {"init": stage_init, "vision": stage_vision, "pretrain": stage_pretrain, "rl": stage_rl, "pools": stage_pools,
             "synthesis_sft": stage_synthesis_sft, "synthesis": stage_synthesis, "eval": stage_eval}


_RUN_ONLY = ("out", "device", "progress")  # settings that may change between the parts of one run


def _check_same_recipe(recipe: ShapesRecipe) -> None:
    """A directory holds one run: resuming it with other sizes or seeds would mix two recipes' stages."""
    saved = recipe.path("recipe.json")
    if not saved.is_file():
        return
    before = json.loads(saved.read_text())
    now = json.loads(json.dumps(asdict(recipe), default=str))
    changed = sorted(k for k in now if k not in _RUN_ONLY and k in before and before[k] != now[k])
    if changed:
        diffs = ", ".join(f"{k}: {before[k]!r} there, {now[k]!r} now" for k in changed)
        raise ValueError(f"{recipe.out} holds a run with other settings ({diffs}); resume it with the same ones "
                         f"or use a new --out")


def run_recipe(recipe: ShapesRecipe, stages: tuple[str, ...] = STAGES) -> None:
    unknown = [s for s in stages if s not in STAGE_FNS]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; choose from {list(STAGES)}")
    Path(recipe.out).mkdir(parents=True, exist_ok=True)
    _check_same_recipe(recipe)
    (Path(recipe.out) / "recipe.json").write_text(json.dumps(asdict(recipe), default=str, indent=1))
    torch.manual_seed(recipe.seed)
    for stage in STAGES:
        if stage in stages:
            _timed(recipe, stage, lambda: STAGE_FNS[stage](recipe))
    if {"vision", "pretrain", "rl", "synthesis_sft", "synthesis"} & set(stages):
        from step3vl_pacore.recipes.evaluate import plot_training
        plot_training(recipe.out, recipe.path("training.png"))


# -- shipping -------------------------------------------------------------------------------------------------


def export_model(recipe: ShapesRecipe, dest: Path, checkpoint: str = "synthesis") -> Path:
    """The trained checkpoint (bf16 safetensors, config, tokenizer) copied to `dest` with a model card
    (README.md: architecture, data, recipe command and seed, the evaluation table) and the plots; `dest` is
    replaced atomically (a complete new copy is swapped with the old one, step3vl/durable.py)."""
    from step3vl_pacore.recipes.evaluate import table

    src = recipe.path(checkpoint)
    if not _done(src):
        raise FileNotFoundError(f"{src}: no trained checkpoint (run the recipe's stages first)")
    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    for png in ("eval.png", "training.png"):
        if recipe.path(png).is_file():
            shutil.copy(recipe.path(png), tmp / png)
    reports = {n: json.loads(recipe.path(f"eval-{n}.json").read_text()) for n in ("rl", "synthesis")
               if recipe.path(f"eval-{n}.json").is_file()}
    (tmp / "README.md").write_text(model_card(recipe, tmp, reports, table(reports) if reports else None, checkpoint))
    replace_dir(tmp, dest)
    return dest


def _param_counts(path: Path) -> dict[str, int]:
    from safetensors import safe_open

    counts: dict[str, int] = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for k in st.keys():
                part = "vision" if k.startswith("vision_model.") else "projector" if k.startswith("vit_large_projector") \
                    else "decoder"
                n = 1
                for d in st.get_slice(k).get_shape():
                    n *= d
                counts[part] = counts.get(part, 0) + n
    return counts


def model_card(recipe: ShapesRecipe, path: Path, reports: dict, eval_table: str | None,
               checkpoint: str = "synthesis") -> str:
    from step3vl.model.vision import tokens_per_view

    from step3vl_pacore.recipes.evaluate import breakdown_table, perception_line

    cfg = json.loads((path / "config.json").read_text())
    v, t = cfg["vision_config"], cfg["text_config"]
    counts = _param_counts(path)
    timings = [json.loads(ln) for ln in recipe.path("timings.jsonl").read_text().splitlines() if ln.strip()] \
        if recipe.path("timings.jsonl").is_file() else []
    lines = [
        "# shapes demo model (STEP3-VL architecture, trained from scratch)",
        "",
        "The default model of `step3vl demo` and `step3vl serve --demo`: a small model of the exact STEP3-VL",
        "architecture (Perception-Encoder ViT with 2-D RoPE, two stride-2 conv downsamplers, projector, Qwen3",
        "decoder) trained by this project's own loops on the `shapes` task (`step3vl/tasks/shapes.py`,",
        "`../shared/SHAPES.md`). It reads pictures of simple shapes and answers counting, colour and size questions,",
        "reasoning first (the shapes numbered left to right with their size, then the steps) and closing with `</think>`.",
        "",
        "## Architecture",
        f"- vision: width {v['width']}, {v['layers']} blocks, {v['heads']} heads, MLP ratio {v.get('mlp_ratio')}, "
        f"patch {v['patch_size']}, global view {v['image_size']} px, crops {'on' if v.get('use_crops', True) else 'off'} "
        f"({tokens_per_view(v['image_size'], v['patch_size'])} image tokens per picture after the downsamplers)",
        f"- decoder (Qwen3): hidden {t['hidden_size']}, {t['num_hidden_layers']} layers, {t['num_attention_heads']} "
        f"heads / {t['num_key_value_heads']} KV heads, head_dim {t['head_dim']}, MLP {t['intermediate_size']}, "
        f"vocabulary {t['vocab_size']} (its own byte-level BPE trained on the task's texts, with the project's "
        "special tokens and `</think>`)",
        f"- parameters: vision {counts.get('vision', 0):,}, projector {counts.get('projector', 0):,}, "
        f"decoder {counts.get('decoder', 0):,}; bf16 safetensors in the official key layout",
        "",
        "## Data and training (every parameter trained, vision tower included)",
        f"0. vision-encoder pre-training: the tower and projector alone name the kind and colour of the one shape "
        f"of {recipe.vision_steps * recipe.vision_batch:,} generated pictures (heads on the max over the image "
        "tokens, then discarded), as STEP3-VL's ViT arrives pre-trained;",
        f"1. pre-training on {recipe.pretrain_examples:,} generated problems (seeds from "
        "1,000,000): captions, questions answered with their reasoning traces, and synthesis prompts (the",
        "   official PaCoRe template) over synthetic reference answers, answered with the same traces;"
        + (f" {100 * recipe.few_shapes_fraction:.0f}% of the pictures have one or two shapes (a curriculum for "
           "shape kinds);" if recipe.few_shapes_fraction else ""),
        f"2. GRPO with outcome rewards (the task's checker), {recipe.rl_steps} iterations x {recipe.rl_problems} "
        f"problems x {recipe.rl_group} samples, rollouts through the engine;",
        f"3. reference pools: the RL model's own PaCoRe runs (rounds {recipe.pool_rounds}) on "
        f"{recipe.pool_problems} training problems;",
        (f"4. synthesis fine-tuning: {recipe.synthesis_sft_draws} synthesis prompts per pool problem over 16-24 of "
         "its own messages, answered with a trace that tallies the references, reads the picture "
         + ("with one of the model's own readings and closes with the canonical answer"
            if recipe.synthesis_sft_readings == "own" else "again") + ", mixed with as many plain questions;"
         if recipe.synthesis_sft_draws else "4. no synthesis fine-tuning: the synthesis RL starts from the GRPO "
         "checkpoint;"),
        f"5. PaCoRe synthesis-episode RL (`step3vl_pacore.episodes`): 16-24 references per episode from the pools, episodes "
        f"whose references are > 75% right filtered out; {recipe.synthesis_steps} iterations x "
        f"{recipe.synthesis_problems} episodes x {recipe.synthesis_group} samples.",
        "",
        f"Recipe: `step3vl recipe shapes --out DIR --seed {recipe.seed} --export DIR2 --export-checkpoint {checkpoint}` "
        "(resumable; `--stages` runs a subset).",
    ]
    if timings:
        lines += ["", "Wall time per stage (" + ", ".join(sorted({f"{x['threads']} torch threads" for x in timings}))
                  + "): " + ", ".join(f"{x['stage']} {x['seconds'] / 60:.1f} min" for x in timings) + "."]
    if eval_table:
        n = next(iter(reports.values()))["problems"]
        lines += ["", f"## Evaluation ({n} held-out problems, seeds 0-{n - 1}; temperature 1.0; 95% intervals)",
                  "", f"Columns: the checkpoints evaluated ({', '.join(f'`{k}`' for k in reports)}: after GRPO, after "
                  f"synthesis training); this model is the `{checkpoint}` checkpoint.", "",
                  eval_table, ""]
        for name, rep in reports.items():
            if rep.get("perception"):
                lines.append(f"- {name}: {perception_line(rep)}")
        for name, rep in reports.items():
            lines += ["", f"By question type ({name}, accuracy %):", "", breakdown_table(rep), "",
                      f"By number of shapes ({name}, accuracy %):", "", breakdown_table(rep, "by_shapes"), ""]
        for name, rep in reports.items():
            d = rep["pacore_medium_minus_sc"]
            lines.append(f"- {name}: PaCoRe medium - SC@{rep['samples']} = {100 * d['mean']:+.1f} points "
                         f"[{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}] (paired over problems)")
        lines += ["", "![accuracy vs trajectories](eval.png)", "", "![training curves](training.png)"]
    return "\n".join(lines) + "\n"

"""Evaluation on held-out `shapes` problems, the way the PaCoRe and STEP3-VL reports evaluate: greedy, single
trajectory (mean over `samples` per problem, temperature 1.0), self-consistency (majority of the canonical
answers) at K = 4 and K = samples, and PaCoRe low ([4] + final) and medium ([16] + final) through the project's
PaCoRe runner, at equal trajectory counts. Accuracy with a 95% interval, by question type and by number of
shapes, tokens per problem; a JSON report and PNG plots.

    step3vl eval shapes --model DIR [--problems 500] [--out report.json]
"""

from __future__ import annotations

import json
import math
import zlib
from collections import Counter, defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

from step3vl.tasks.shapes import TEMPLATE_NAMES, ShapesProblem, final_answer, generate, perception, shapes_reward

from step3vl_pacore.config import PaCoReConfig
from step3vl_pacore.runner import PaCoRe

Z95 = 1.959964


# -- statistics ---------------------------------------------------------------------------------------------


def wilson(successes: float, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (stays inside [0, 1] near the ends, unlike the normal one)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    den = 1 + Z95 ** 2 / n
    centre = (p + Z95 ** 2 / (2 * n)) / den
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95 ** 2 / (4 * n * n)) / den
    return (max(0.0, centre - half), min(1.0, centre + half))


def mean_interval(scores: list[float]) -> tuple[float, float]:
    """95% normal interval of a mean of per-problem scores (single-trajectory accuracy, paired differences)."""
    n = len(scores)
    m = sum(scores) / n
    if n < 2:
        return (m, m)
    sd = math.sqrt(sum((s - m) ** 2 for s in scores) / (n - 1))
    return (m - Z95 * sd / math.sqrt(n), m + Z95 * sd / math.sqrt(n))


def majority(answers: list[str | None]) -> str | None:
    """The most common answer (responses without one do not vote); ties go to the answer seen first."""
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return None
    best = max(votes.values())
    return next(a for a in answers if a is not None and votes[a] == best)


def summary(scores: list[float], binary: bool) -> dict:
    n = len(scores)
    acc = sum(scores) / n if n else 0.0
    lo, hi = wilson(sum(scores), n) if binary else mean_interval(scores)
    return {"accuracy": acc, "ci95": [lo, hi], "n": n}


# -- running ------------------------------------------------------------------------------------------------


def _seed(*parts: Any) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


def _sample_all(llm, problems: list[ShapesProblem], images: list, samples: int, max_tokens: int, seed: int):
    from step3vl.engine import SamplingParams

    requests = []
    for p, img in zip(problems, images):
        text, sources = llm.processor.apply_chat_template(p.messages(img), add_generation_prompt=True)
        requests.append({"prompt": text, "images": sources})
    greedy = llm.generate(requests, SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)
    params = [SamplingParams(n=samples, temperature=1.0, top_p=1.0, max_tokens=max_tokens, seed=_seed(seed, p.seed))
              for p in problems]
    sampled = llm.generate(requests, params, use_tqdm=False)
    return greedy, sampled


def _pacore(llm, problems, images, preset: str, max_tokens: int, seed: int, progress: bool):
    cfg = PaCoReConfig.preset(preset, max_tokens=max_tokens, seed=seed, record_reasoning=False,
                              max_concurrent_problems=64)
    records = [{"id": p.id, "messages": p.messages(img)} for p, img in zip(problems, images)]
    return PaCoRe(llm, cfg).run(records, progress=progress)


def evaluate_shapes(model: str | Path, seeds: list[int], samples: int = 16, max_tokens: int = 128, seed: int = 0,
                    device: str | None = None, engine_kwargs: dict | None = None, progress: bool = False,
                    llm=None) -> dict:
    """The report of one checkpoint on the problems of `seeds` (see the module docstring)."""
    from step3vl.engine import LLM

    if samples < 4 or samples % 4:
        raise ValueError(f"samples = {samples}: need a multiple of 4 (self-consistency at K = 4 uses disjoint sets)")
    llm = llm or LLM(model, device=device, **(engine_kwargs or {}))
    problems = [generate(s) for s in seeds]
    images = [p.image() for p in problems]
    greedy, sampled = _sample_all(llm, problems, images, samples, max_tokens, seed)
    pacore = {name: _pacore(llm, problems, images, name, max_tokens, seed, progress) for name in ("low", "medium")}
    rows = []
    for i, p in enumerate(problems):
        texts = [c.text for c in sampled[i].outputs]
        answers = [final_answer(t) for t in texts]
        correct = [a == p.answer for a in answers]
        sc4 = [majority(answers[j:j + 4]) == p.answer for j in range(0, samples, 4)]
        tokens = [len(c.token_ids) for c in sampled[i].outputs]
        row = {"seed": p.seed, "template": p.template, "shapes": len(p.shapes), "answer": p.answer,
               "greedy": float(shapes_reward(greedy[i].outputs[0].text, p.answer)),
               "single": sum(correct) / samples, "sc4": sum(sc4) / len(sc4),
               f"sc{samples}": float(majority(answers) == p.answer),
               "tokens": {"greedy": len(greedy[i].outputs[0].token_ids), "single": sum(tokens) / samples,
                          "sc4": 4 * sum(tokens) / samples, f"sc{samples}": sum(tokens)},
               "sampled_answers": answers, "perception": asdict(perception(p, greedy[i].outputs[0].text))}
        for name, results in pacore.items():
            r = results[i]
            row[f"pacore_{name}"] = float(r.ok and shapes_reward(r.final_response, p.answer) == 1.0)
            row["tokens"][f"pacore_{name}"] = r.effective_ttc
            row[f"pacore_{name}_answer"] = r.final_response if r.ok else None
        rows.append(row)
    return report(rows, samples, str(model))


def methods(samples: int) -> list[tuple[str, int, bool]]:
    """(name, trajectories per problem, whether its per-problem score is 0/1)."""
    return [("greedy", 1, True), ("single", 1, False), ("sc4", 4, False), (f"sc{samples}", samples, True),
            ("pacore_low", 5, True), ("pacore_medium", 17, True)]


def report(rows: list[dict], samples: int, model: str) -> dict:
    out: dict = {"model": model, "problems": len(rows), "samples": samples, "overall": {}, "by_template": {},
                 "by_shapes": {}, "tokens_per_problem": {}}
    for name, trajectories, binary in methods(samples):
        out["overall"][name] = {**summary([r[name] for r in rows], binary), "trajectories": trajectories}
        out["tokens_per_problem"][name] = sum(r["tokens"][name] for r in rows) / len(rows)
        for key, group_of in (("by_template", lambda r: TEMPLATE_NAMES[r["template"]]),
                              ("by_shapes", lambda r: str(r["shapes"]))):
            groups = defaultdict(list)
            for r in rows:
                groups[group_of(r)].append(r[name])
            for g, scores in sorted(groups.items()):
                out[key].setdefault(g, {})[name] = summary(scores, binary)
    out["perception"] = perception_summary([r["perception"] for r in rows if "perception" in r])
    diff = [r["pacore_medium"] - r[f"sc{samples}"] for r in rows]
    out["pacore_medium_minus_sc"] = {"mean": sum(diff) / len(diff), "ci95": list(mean_interval(diff))}
    out["rows"] = rows
    return out


def perception_summary(seen: list[dict]) -> dict:
    """From the greedy listings: how often the number of shapes listed is right, and the share of kinds and
    colours named right (positions both lists have), with 95% intervals and the kind confusion counts."""
    if not seen:
        return {}
    compared = sum(p["compared"] for p in seen)
    confusion: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for p in seen:
        for true_kind, listed_kind in p["kind_pairs"]:
            confusion[true_kind][listed_kind] += 1
    rate = lambda k, n: {"rate": k / n if n else 0.0, "ci95": list(wilson(k, n)), "n": n}  # noqa: E731
    return {"count_right": rate(sum(p["listed"] == p["actual"] for p in seen), len(seen)),
            "kind_right": rate(sum(p["kinds_right"] for p in seen), compared),
            "colour_right": rate(sum(p["colours_right"] for p in seen), compared),
            "kind_confusion": {k: dict(v) for k, v in sorted(confusion.items())}}


def perception_line(rep: dict) -> str:
    p = rep.get("perception") or {}
    if not p:
        return "perception: no listings"
    show = lambda k: f"{100 * p[k]['rate']:.1f}% [{100 * p[k]['ci95'][0]:.1f}, {100 * p[k]['ci95'][1]:.1f}]"  # noqa: E731
    return (f"perception (greedy listings): shape count right {show('count_right')}, kinds right {show('kind_right')}, "
            f"colours right {show('colour_right')}")


# -- tables and plots ---------------------------------------------------------------------------------------


def table(reports: dict[str, dict]) -> str:
    """A markdown table: one row per method, one column per checkpoint (accuracy % [95% CI], tokens)."""
    names = list(reports)
    first = reports[names[0]]
    head = "| method | trajectories | " + " | ".join(f"{n}: accuracy % [95% CI] | {n}: tokens/problem" for n in names)
    lines = [head, "|" + "---|" * (2 + 2 * len(names))]
    for method, stats in first["overall"].items():
        cells = []
        for n in names:
            s = reports[n]["overall"][method]
            cells += [f"{100 * s['accuracy']:.1f} [{100 * s['ci95'][0]:.1f}, {100 * s['ci95'][1]:.1f}]",
                      f"{reports[n]['tokens_per_problem'][method]:.0f}"]
        lines.append(f"| {method} | {stats['trajectories']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def breakdown_table(rep: dict, key: str = "by_template") -> str:
    """Accuracy % per question type (or per number of shapes: key="by_shapes") for every method."""
    names = [m for m, _, _ in methods(rep["samples"])]
    lines = [f"| {'question type' if key == 'by_template' else 'shapes'} | n | " + " | ".join(names) + " |",
             "|" + "---|" * (2 + len(names))]
    for group, stats in rep[key].items():
        lines.append(f"| {group} | {stats[names[0]]['n']} | "
                     + " | ".join(f"{100 * stats[m]['accuracy']:.0f}" for m in names) + " |")
    return "\n".join(lines)


def plot_evaluation(reports: dict[str, dict], path: str | Path) -> None:
    """Accuracy against trajectories per problem: self-consistency and PaCoRe, one colour per checkpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for (label, rep), colour in zip(reports.items(), ("tab:blue", "tab:red", "tab:green")):
        o = rep["overall"]
        sc = [m for m, _, _ in methods(rep["samples"]) if m in ("single", "sc4", f"sc{rep['samples']}")]
        xs, ys = [o[m]["trajectories"] for m in sc], [100 * o[m]["accuracy"] for m in sc]
        errs = [[100 * (o[m]["accuracy"] - o[m]["ci95"][0]) for m in sc], [100 * (o[m]["ci95"][1] - o[m]["accuracy"]) for m in sc]]
        ax.errorbar(xs, ys, yerr=errs, marker="o", color=colour, capsize=3, label=f"{label}: self-consistency")
        pc = ["pacore_low", "pacore_medium"]
        xs, ys = [o[m]["trajectories"] for m in pc], [100 * o[m]["accuracy"] for m in pc]
        errs = [[100 * (o[m]["accuracy"] - o[m]["ci95"][0]) for m in pc], [100 * (o[m]["ci95"][1] - o[m]["accuracy"]) for m in pc]]
        ax.errorbar(xs, ys, yerr=errs, marker="s", linestyle="--", color=colour, capsize=3, label=f"{label}: PaCoRe")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("trajectories per problem")
    ax.set_ylabel("accuracy on held-out problems (%)")
    ax.set_title(f"shapes, {next(iter(reports.values()))['problems']} held-out problems, 95% CI")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def plot_training(out: str | Path, path: str | Path) -> None:
    """The recipe's curves: the vision stage's accuracies, pre-training loss (train and held-out), RL and
    synthesis-RL rewards."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out = Path(out)
    vis, pre, rl, syn = (_read_log(out / f"{s}.log.jsonl") for s in ("vision", "pretrain", "rl", "synthesis"))
    fig, all_axes = plt.subplots(1, 4, figsize=(17, 3.6))
    vax, axes = all_axes[0], all_axes[1:]
    if vis:
        window = 25  # each step's batch is fresh pictures: a running mean is a held-out accuracy
        for name in vis[0]["accuracy"]:
            sums = np.cumsum([0.0] + [r["accuracy"][name] for r in vis])
            starts = np.maximum(np.arange(1, len(sums)) - window, 0)
            smooth = (sums[1:] - sums[starts]) / (np.arange(1, len(sums)) - starts)
            vax.plot([r["step"] for r in vis], smooth, lw=0.9, label=name)
    vax.set(title="vision encoder (lone shapes)", xlabel="optimizer step", ylabel="accuracy", ylim=(0, 1))
    if pre:
        axes[0].plot([r["step"] for r in pre], [r["loss"] for r in pre], lw=0.8, label="train")
        ev = [r for r in pre if r.get("eval_loss") is not None]
        axes[0].plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", label="held-out")
        axes[0].set_yscale("log")
    axes[0].set(title="pre-training", xlabel="optimizer step", ylabel="cross-entropy")
    for ax, log, title in ((axes[1], rl, "RL (GRPO, outcome reward)"), (axes[2], syn, "synthesis-episode RL")):
        if log:
            ax.plot([r["step"] for r in log], [r["reward_mean"] for r in log], lw=0.8, label="rollout reward")
            ev = [r for r in log if r.get("eval_reward") is not None]
            if ev:
                ax.plot([r["step"] for r in ev], [r["eval_reward"] for r in ev], "o-", label="held-out reward")
        ax.set(title=title, xlabel="iteration", ylabel="mean reward", ylim=(0, 1))
    for ax in all_axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

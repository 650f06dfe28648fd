"""Helpers shared by the benchmark scripts: the cached `small` checkpoint, timing, tables, JSON output.

Run the scripts from the repository root, e.g. `python bench/load.py`; results go to bench/out/.
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

OUT = Path(__file__).resolve().parent / "out"


def small_checkpoint(path: str | Path | None = None, preset: str = "small") -> Path:
    """The generated checkpoint at `path` (default bench/out/ckpt-<preset>), written once and reused."""
    path = Path(path) if path else OUT / f"ckpt-{preset}"
    if not ((path / "config.json").is_file() and (path / "model.safetensors.index.json").is_file()):
        from step3vl.tools.make_tiny_checkpoint import make_tiny_checkpoint

        make_tiny_checkpoint(path, preset=preset, seed=0, shards=2)
    return path


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def median_seconds(fn: Callable[[], object], runs: int, warmup: int = 1) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def environment() -> dict:
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu,
            "cores": os.cpu_count(), "python": platform.python_version()}


def print_table(rows: Sequence[dict], columns: Sequence[str]) -> None:
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def write_json(name: str, payload: dict) -> Path:
    """name: a stem under bench/out/, or a path (with a / or a .json suffix) used as given."""
    path = Path(name) if "/" in name or name.endswith(".json") else OUT / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


WORDS = ("the triangle circle square area angle side length sum of a and b is equal to two three four five "
         "number answer first then so we find value x y point line find compute prove that each every").split()


def make_problems(tokenizer, n: int, prompt_tokens: int, seed: int) -> list:
    """n distinct questions whose chat prompts are about `prompt_tokens` tokens long."""
    from step3vl_pacore import Problem
    from step3vl.processor.chat import render_chat

    problems = []
    for i in range(n):
        rng = random.Random(seed * 1000 + i)
        words = [f"Problem {i}:"]
        while True:
            words += [rng.choice(WORDS) for _ in range(16)]
            text = " ".join(words) + "?"
            prompt = render_chat([{"role": "user", "content": text}], tokenizer.chat_template)
            if len(tokenizer.encode(prompt)) >= prompt_tokens:
                break
        problems.append(Problem.from_question(text, id=f"p{i}"))
    return problems

"""Training throughput at N = 1 and N = 2 ranks (torchrun, gloo, FSDP2) on this machine's CPU, and the memory
plan of STEP3-VL-10B sharded over 8, 16 and 64 GPUs.

    python bench/distributed.py [--preset shapes] [--examples 96] [--steps 6]

The same run (checkpoint, data, global batch, seed) is trained by one process with all cores and by two ranks
with half the cores each: on a 2-core machine the two ranks share the cores the one process had, so the ratio
measures what sharding and the collectives cost, not a speed-up. Prints a table; JSON under bench/out/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).resolve().parent / "out"
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def _data(d: Path, n: int) -> Path:
    from step3vl.tasks.shapes import generate
    from step3vl_pacore.recipes.shapes_data import answered_record

    (d / "images").mkdir()
    records = [answered_record(generate(1_000_000 + i), d / "images") for i in range(n)]
    path = d / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _run(ranks: int, ckpt: Path, data: Path, out: Path, steps: int, threads: int) -> dict:
    log = out.with_suffix(".jsonl")
    args = ["train", "--model", str(ckpt), "--data", str(data), "--out", str(out), "--log-file", str(log),
            "--max-tokens-per-batch", "1024", "--grad-accum", "2", "--max-steps", str(steps), "--lr", "1e-3",
            "--threads", str(threads)]
    launch = ([sys.executable, "-m", "step3vl"] if ranks == 1 else
              [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--standalone",
               "-m", "step3vl"])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    subprocess.run(launch + args, check=True, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    logs = [json.loads(line) for line in log.read_text().splitlines()][1:]  # the first step warms up
    tokens, seconds = sum(s["tokens"] for s in logs), sum(s["seconds"] for s in logs)
    return {"ranks": ranks, "threads_per_rank": threads, "steps": len(logs) + 1, "tokens_per_s": tokens / seconds,
            "losses": [s["loss"] for s in logs], "wall_s": wall}


def main() -> None:
    from step3vl.tools.make_tiny_checkpoint import make_tiny_checkpoint
    from step3vl.train.memory_plan import format_table, official_config, plan

    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="shapes")
    ap.add_argument("--examples", type=int, default=96)
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        ckpt = make_tiny_checkpoint(d / "ckpt", args.preset, seed=0, shards=1, for_training=True)
        data = _data(d, args.examples)
        one = _run(1, ckpt, data, d / "one", args.steps, cores)
        two = _run(2, ckpt, data, d / "two", args.steps, max(1, cores // 2))
    same = max(abs(a - b) for a, b in zip(one["losses"], two["losses"]))
    print(f"{'ranks':>5} {'threads/rank':>12} {'tokens/s':>9}")
    for r in (one, two):
        print(f"{r['ranks']:>5} {r['threads_per_rank']:>12} {r['tokens_per_s']:>9.0f}")
    print(f"N=2 / N=1 throughput: {two['tokens_per_s'] / one['tokens_per_s']:.2f}x on {cores} cores "
          f"(same run: step losses differ by at most {same:.1e})")
    rows = plan(official_config(), [8, 16, 64], [4096, 8192, 16384])
    print(format_table(rows))
    OUT.mkdir(exist_ok=True)
    (OUT / "distributed.json").write_text(json.dumps({"preset": args.preset, "cores": cores, "runs": [one, two],
                                                      "max_loss_diff": same}, indent=2))


if __name__ == "__main__":
    main()

"""The shipped shapes model on the bundled demo picture: `step3vl demo`'s PaCoRe run over 10 seeds (the issue's
"answers `5, 2, purple` in at least 9 of 10 seeds"), and the same 10 seeds as single trajectories and as
self-consistency at the same trajectory count, for comparison.

    python bench/shapes_demo.py [--model step3vl/assets/shapes_demo] [--seeds 10] [--preset medium]

Prints one line per seed and the totals; JSON under bench/out/.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).resolve().parent / "out"
# this folder's kernels.py and pacore.py would shadow the top-level `kernels` (transformers imports it) and an
# installed `pacore`: take the folder off the path before importing anything.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def main() -> None:
    from step3vl_pacore import PaCoRe, PaCoReConfig, Problem
    from step3vl_pacore.recipes.evaluate import majority
    from step3vl import LLM, SamplingParams
    from step3vl.tasks.shapes import final_answer, shapes_reward

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=ROOT / "step3vl" / "assets" / "shapes_demo")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--preset", default="medium")
    args = ap.parse_args()
    problem = json.loads((ROOT / "step3vl" / "assets" / "demo_problem.json").read_text())
    image = ROOT / "step3vl" / "assets" / problem["image"]
    llm = LLM(args.model, kv_cache_memory="256MiB")
    rows = []
    t0 = time.perf_counter()
    for seed in range(args.seeds):
        cfg = PaCoReConfig.preset(args.preset, max_tokens=128, message_max_tokens=24, seed=seed)
        res = PaCoRe(llm, cfg).run([Problem.from_question(problem["question"], image=str(image), id="demo")])[0]
        k = cfg.trajectories_per_problem
        outs = llm.chat(Problem.from_question(problem["question"], image=str(image)).messages,
                        SamplingParams(n=k, temperature=1.0, max_tokens=128, seed=1000 + seed), use_tqdm=False)
        answers = [final_answer(c.text) for c in outs[0].outputs]
        rows.append({"seed": seed, "pacore": res.final_response if res.ok else None,
                     "pacore_ok": res.ok and shapes_reward(res.final_response, problem["answer"]) == 1.0,
                     "single_accuracy": sum(a == problem["answer"] for a in answers) / k,
                     f"sc{k}": majority(answers), f"sc{k}_ok": majority(answers) == problem["answer"]})
        r = rows[-1]
        print(f"seed {seed}: PaCoRe {args.preset} -> {r['pacore']!r} ({'right' if r['pacore_ok'] else 'wrong'}); "
              f"single {r['single_accuracy']:.0%}; SC@{k} -> {r[f'sc{k}']!r}")
    summary = {"model": str(args.model), "preset": args.preset, "seeds": args.seeds,
               "pacore_right": sum(r["pacore_ok"] for r in rows),
               "sc_right": sum(r[f"sc{k}_ok"] for r in rows),
               "single_accuracy": sum(r["single_accuracy"] for r in rows) / len(rows),
               "seconds": time.perf_counter() - t0, "rows": rows}
    print(f"PaCoRe {args.preset}: {summary['pacore_right']}/{args.seeds} right; SC@{k}: {summary['sc_right']}/"
          f"{args.seeds}; single trajectory {summary['single_accuracy']:.1%}; {summary['seconds']:.0f}s")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "shapes_demo.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

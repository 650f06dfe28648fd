"""N-gram speculative decoding against plain decoding, same engine, same run.

Outputs are identical either way (tests/engine/test_speculative.py); what changes is the number of engine steps
and the time. Checkpoint: the `small` preset (random weights). Random weights repeat themselves under greedy
decoding, which is where prompt lookup finds its drafts; they never quote a prompt the way PaCoRe's synthesis
rounds quote their reference messages, so the acceptance here is the model's, not a real model's, and the
sampled case (temperature 1: no repeats, no drafts) shows the cost when lookup finds nothing. Batches above 1 also
run with `disable_by_batch_size=2` (drafts only while one sample decodes), the setting for a CPU engine: a verify
chunk multiplies the rows every linear computes, which a 2-core CPU pays in full.

    python bench/speculative.py [--k 4] [--max-tokens 256] [--batch 1,8] [--repeats 5] [--quick]

Reports the median wall time (runs interleaved across sides), tokens/s, engine steps and the draft acceptance for each side, and its ratio to
plain decoding; JSON under bench/out/.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from step3vl import LLM, SamplingParams

sys.path.append(str(Path(__file__).resolve().parent))
from _common import environment, print_table, small_checkpoint, write_json  # noqa: E402

PROMPT = "Write the list again and again: red, green, blue, red, green, blue, red, green, blue. Then: "


def compare(args, batch: int, temperature: float, sides: dict[str, dict | None]) -> list[dict]:
    """Every side's engine built first, then the timed runs interleaved side by side, so that drift of the machine
    falls on every side alike; the median per side."""
    llms = {name: LLM(args.ckpt, dtype="float32", device=args.device, kv_cache_memory="1GiB", speculative_config=spec)
            for name, spec in sides.items()}
    params = SamplingParams(temperature=temperature, max_tokens=args.max_tokens, ignore_eos=True, seed=0)
    prompts = [PROMPT + str(i) for i in range(batch)]
    walls: dict[str, list[float]] = {name: [] for name in sides}
    ids = {}
    for llm in llms.values():
        llm.generate(prompts[:1], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    for _ in range(args.repeats):  # the same seeds each time: the same tokens, the same drafts
        for name, llm in llms.items():
            llm.reset_stats()
            t = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            walls[name].append(time.perf_counter() - t)
            ids[name] = [c.token_ids for o in outs for c in o.outputs]
    rows, plain = [], statistics.median(walls["plain"])
    for name, llm in llms.items():
        if ids[name] != ids["plain"]:
            raise RuntimeError(f"batch {batch}, temperature {temperature}: outputs differ with {name}")
        wall, s = statistics.median(walls[name]), llm.kv_stats()
        tokens = sum(len(t) for t in ids[name])
        rows.append({"batch": batch, "side": name, "wall_s": wall, "tok_per_s": tokens / wall,
                     "steps": llm.engine.counters.steps, "drafts": s["spec_draft_tokens"],
                     "accepted": s["spec_accepted_tokens"],
                     "acceptance": s["spec_accepted_tokens"] / max(s["spec_draft_tokens"], 1),
                     "speedup": plain / wall if name != "plain" else ""})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", type=Path, default=None)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per side, interleaved (median)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="64 new tokens, batch 1")
    args = ap.parse_args()
    if args.quick:
        args.max_tokens, args.batch = 64, "1"
    args.ckpt = args.ckpt or small_checkpoint()
    spec = {"method": "ngram", "num_speculative_tokens": args.k}
    rows = []
    for batch in map(int, args.batch.split(",")):
        sides = {"plain": None, f"ngram k={args.k}": spec}
        if batch > 1:
            sides[f"ngram k={args.k}, disable_by_batch_size=2"] = {**spec, "disable_by_batch_size": 2}
        for temperature, case in ((0.0, "greedy"), (1.0, "sampled T=1")):
            rows += [{"case": case, **r} for r in compare(args, batch, temperature, sides)]
    print_table(rows, ["case", "batch", "side", "wall_s", "tok_per_s", "steps", "drafts", "accepted", "acceptance",
                       "speedup"])
    path = write_json(f"speculative-{args.device}", {"env": environment(), "args": {k: str(v) for k, v in vars(args).items()},
                                                     "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

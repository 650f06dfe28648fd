"""What the sampler's per-request rules cost: the same decode workload plain, with penalties, with structured
outputs (a JSON schema, a regex), measured in one run on one engine.

Workload: --requests prompts of ~--prompt-tokens tokens, one sample each, --max-tokens new tokens (ignore_eos, so
every row decodes the same number of steps; a guided row that completes its grammar early ends there, so the
table reports tokens/s, not just wall time). `small` preset, random weights.

    python bench/sampling_rules.py [--ckpt DIR] [--requests 16] [--prompt-tokens 256] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

# This folder has a pacore.py: take it off the path before importing the `pacore` package (_common needs it).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
import step3vl_pacore  # noqa: E402,F401 - the package, before bench/ (which has a pacore.py) joins the path
from step3vl import LLM, SamplingParams  # noqa: E402

sys.path.append(str(_HERE))
from _common import environment, make_problems, print_table, small_checkpoint, write_json  # noqa: E402

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "n", "tags"]}

CASES = {
    "plain": {},
    "penalties (rep 1.1, presence 0.5, frequency 0.2)": dict(repetition_penalty=1.1, presence_penalty=0.5,
                                                             frequency_penalty=0.2),
    "structured: JSON schema": dict(structured_outputs={"json": SCHEMA}),
    "structured: regex": dict(structured_outputs={"regex": r"([a-z]+ ){4,}[0-9]+"}),
}


def run(llm: LLM, prompts: list, args, extra: dict) -> dict:
    *timed, warm = prompts
    params = [SamplingParams(seed=i, max_tokens=args.max_tokens, ignore_eos=True, **extra) for i in range(len(timed))]
    llm.generate([warm], params[0], use_tqdm=False)  # warm-up on another prompt (and the grammar compile)
    t0 = time.perf_counter()
    outs = llm.generate(timed, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"wall_s": wall, "tokens": tokens, "tok_per_s": tokens / wall}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", type=Path, default=None)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    llm = LLM(small_checkpoint(args.ckpt), kv_cache_memory="2GiB")
    rows = []
    for k, (name, extra) in enumerate(CASES.items()):
        # fresh prompts per case: no case finds another's prompts in the prefix cache
        problems = make_problems(llm.get_tokenizer(), args.requests + 1, args.prompt_tokens, 100 + k)
        prompts = [{"prompt": llm.processor.apply_chat_template(p.messages)[0]} for p in problems]
        rows.append({"case": name, **run(llm, prompts, args, extra)})
    base = rows[0]["tok_per_s"]
    for r in rows:
        r["vs_plain"] = r["tok_per_s"] / base
    print_table(rows, ["case", "wall_s", "tokens", "tok_per_s", "vs_plain"])
    print(f"wrote {write_json('sampling-rules', {'workload': vars(args) | {'ckpt': str(args.ckpt)}, 'environment': environment(), 'rows': rows})}")


if __name__ == "__main__":
    main()

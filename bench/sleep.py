"""Peak memory of RL iterations with the engine awake vs asleep through each update (`RLConfig.engine_sleep_level`).

Same workload as bench/rl.py (P chat prompts, G responses each, one on-policy update per iteration, the engine
synced after it), run in a fresh process per setting so each peak is its own: peak RSS on the CPU, peak CUDA
memory allocated on a GPU. Level 1 frees the engine's KV pool during the update (and on a GPU moves the engine's
weights to host memory); level 2 also discards the engine's weights, which update_weights brings back.

    python bench/sleep.py [--ckpt DIR] [--kv-cache-memory 1GiB] [--prompts 4] [--group 8] [--iters 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, print_table, small_checkpoint, write_json  # noqa: E402


def child(args) -> dict:
    from rl import make_prompts, reward  # bench/rl.py's workload

    from step3vl.engine import LLM
    from step3vl.loader import load_model
    from step3vl.train import OptimConfig, RLConfig, RLPrompt, RLTrainer

    torch.manual_seed(0)
    llm = LLM(args.ckpt, kv_cache_memory=args.kv_cache_memory)
    conversations = make_prompts(llm.get_tokenizer(), args.prompts, args.prompt_tokens)
    cfg = RLConfig(optim=OptimConfig(lr=1e-5, weight_decay=0.0), group_size=args.group, max_tokens=args.max_tokens,
                   total_steps=args.iters, truncated_reward=None, engine_sleep_level=args.level)
    trainer = RLTrainer(load_model(args.ckpt, dtype=torch.float32, device=llm.device), llm, reward, cfg)
    prompts = [RLPrompt(c, None, id=str(i)) for i, c in enumerate(conversations)]
    t0 = time.perf_counter()
    logs = [trainer.step(prompts) for _ in range(args.iters)]
    cuda = torch.cuda.is_available()
    return {"seconds": time.perf_counter() - t0, "reward_mean": [l.reward_mean for l in logs],
            "peak_bytes": torch.cuda.max_memory_allocated() if cuda else
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_kind": "CUDA allocated" if cuda else "RSS", "kv_bytes": llm.kv_stats()["blocks_total"] *
            llm.kv_stats()["bytes_per_block"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", type=Path, default=None)
    ap.add_argument("--kv-cache-memory", default="1GiB")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--level", type=int, default=None, help=argparse.SUPPRESS)  # child process
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="sleep")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    args.ckpt = small_checkpoint(args.ckpt)
    results = {}
    for level in (None, 1, 2):
        cmd = [sys.executable, __file__, "--child", "--ckpt", str(args.ckpt), "--kv-cache-memory",
               args.kv_cache_memory, "--prompts", str(args.prompts), "--group", str(args.group), "--prompt-tokens",
               str(args.prompt_tokens), "--max-tokens", str(args.max_tokens), "--iters", str(args.iters)]
        cmd += [] if level is None else ["--level", str(level)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[f"sleep level {level}" if level else "awake"] = json.loads(out.strip().splitlines()[-1])
    base = results["awake"]["peak_bytes"]
    rows = [{"setting": k, "peak MiB": v["peak_bytes"] / 2**20, "vs awake": v["peak_bytes"] / base,
             "seconds": v["seconds"], "rewards": v["reward_mean"]} for k, v in results.items()]
    print(f"peak {results['awake']['peak_kind']}; engine KV pool {results['awake']['kv_bytes'] / 2**20:.0f} MiB")
    print_table(rows, ["setting", "peak MiB", "vs awake", "seconds", "rewards"])
    same = len({json.dumps(v["reward_mean"]) for v in results.values()}) == 1
    print("same rewards in every setting:", same)
    print("wrote", write_json(args.out, {"env": environment(), "args": {k: str(v) for k, v in vars(args).items()},
                                         "results": results, "same_rewards": same}))


if __name__ == "__main__":
    main()

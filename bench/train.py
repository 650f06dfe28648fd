"""Training throughput and peak memory against transformers on the same weights and the same examples.

Workload: N text examples with lengths drawn uniformly from [min_len, max_len] (random token ids; every token a
target), AdamW steps of ~`--tokens` real tokens each, fp32 on both sides.
- ours: `Pretrainer` — examples packed into one sequence per micro-batch (no padding), log-probs over chunks of
  rows (no full [T, vocab] logits);
- transformers: `Qwen3ForCausalLM` with the same weights, right-padded batches of the same examples (labels -100
  on padding), `loss.backward()`, same optimizer settings — the loop a user of transformers would write.
Each side runs in its own process, so its peak RSS is its own.

    python bench/train.py [--ckpt DIR] [--examples 48] [--min-len 64] [--max-len 768] [--tokens 4096] [--out F]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, print_table, small_checkpoint, write_json  # noqa: E402


def _examples(n: int, lo: int, hi: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def _groups(examples: list[list[int]], budget: int) -> list[list[list[int]]]:
    """The same grouping for both sides: consecutive examples up to `budget` real tokens."""
    out, cur, size = [], [], 0
    for ex in examples:
        if cur and size + len(ex) > budget:
            out.append(cur)
            cur, size = [], 0
        cur.append(ex)
        size += len(ex)
    return out + ([cur] if cur else [])


def run_ours(ckpt: Path, groups) -> dict:
    from step3vl.loader import load_model
    from step3vl.train import OptimConfig, PretrainConfig, TrainExample, pack
    from step3vl.train.logprobs import next_token_loss
    from step3vl.train.optim import build_optimizer, clip_and_step
    from step3vl.train.pretrain import set_trainable

    model = load_model(ckpt, dtype=torch.float32)
    set_trainable(model, train_vision=False)
    cfg = PretrainConfig(optim=OptimConfig(lr=1e-5, weight_decay=0.0))
    opt, sched = build_optimizer(model, cfg.optim, len(groups))
    model.train()
    times, losses = [], []
    for g in groups:
        t0 = time.perf_counter()
        batch = pack([TrainExample(ex, ex) for ex in g])
        loss_sum, n = next_token_loss(model, batch)
        (loss_sum / n).backward()
        clip_and_step(model, opt, sched, cfg.optim.max_grad_norm)
        times.append(time.perf_counter() - t0)
        losses.append(loss_sum.item() / n)
    return {"times": times, "losses": losses}


def run_hf(ckpt: Path, groups) -> dict:
    from engine import hf_model  # bench/engine.py: transformers Qwen3 with the checkpoint's decoder weights

    model = hf_model(ckpt, torch.float32).train()
    opt = torch.optim.AdamW([p for p in model.parameters()], lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0)
    times, losses = [], []
    for g in groups:
        t0 = time.perf_counter()
        width = max(len(ex) for ex in g)
        ids = torch.tensor([ex + [0] * (width - len(ex)) for ex in g])
        mask = torch.tensor([[1] * len(ex) + [0] * (width - len(ex)) for ex in g])
        labels = torch.tensor([ex + [-100] * (width - len(ex)) for ex in g])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    return {"times": times, "losses": losses}


def _child(args) -> None:
    torch.manual_seed(0)
    payload = json.loads(Path(args.child_input).read_text())
    groups = payload["groups"]
    result = (run_ours if args.side == "ours" else run_hf)(Path(payload["ckpt"]), groups)
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(result))


def _side(side: str, input_path: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--side", side, "--child-input", str(input_path)],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{side} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", type=Path, default=None)
    ap.add_argument("--examples", type=int, default=48)
    ap.add_argument("--min-len", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=768)
    ap.add_argument("--tokens", type=int, default=4096, help="real tokens per optimizer step")
    ap.add_argument("--out", default="train")
    ap.add_argument("--side", choices=["ours", "hf"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-input", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        return _child(args)
    ckpt = small_checkpoint(args.ckpt)
    vocab = json.loads((ckpt / "config.json").read_text())["text_config"]["vocab_size"]
    groups = _groups(_examples(args.examples, args.min_len, args.max_len, vocab), args.tokens)
    real = [sum(map(len, g)) for g in groups]
    padded = [len(g) * max(map(len, g)) for g in groups]
    input_path = Path(__file__).resolve().parent / "out" / "train-input.json"
    input_path.parent.mkdir(parents=True, exist_ok=True)
    input_path.write_text(json.dumps({"ckpt": str(ckpt), "groups": groups}))
    results = {side: _side(side, input_path) for side in ("ours", "hf")}
    rows = []
    for side, r in results.items():
        t = sum(r["times"][1:])  # the first step warms up allocators and kernels
        rows.append({"side": side, "steps": len(r["times"]), "seconds (steps 2..)": t,
                     "real tok/s": sum(real[1:]) / t, "peak RSS GiB": r["peak_rss_bytes"] / 2**30,
                     "first loss": r["losses"][0], "last loss": r["losses"][-1]})
    ratio = rows[0]["real tok/s"] / rows[1]["real tok/s"]
    print_table(rows, list(rows[0]))
    print(f"\nthroughput ours / transformers: {ratio:.2f}x; padding in transformers' batches: "
          f"{sum(padded) / sum(real):.2f}x the real tokens; peak RSS ratio (hf / ours): "
          f"{rows[1]['peak RSS GiB'] / rows[0]['peak RSS GiB']:.2f}x")
    path = write_json(args.out, {"env": environment(), "ckpt": str(ckpt), "rows": rows, "throughput_ratio": ratio,
                                 "padding_factor": sum(padded) / sum(real), "args": vars(args)})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

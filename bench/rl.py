"""One RL iteration (rollouts + policy update) against a transformers-only loop, same weights, same prompts.

Workload: P chat prompts (~`--prompt-tokens` tokens each), a group of G sampled responses per prompt of up to
`--max-tokens` tokens, an outcome reward (a fixed hash of the response text: mixed groups, so every group
trains), GRPO advantages, one on-policy update; fp32 on both sides on the CPU (on a GPU our engine samples in
bf16, both policies train in fp32); `--iters` iterations, the first one warm-up.
- ours: `RLTrainer.step` — the engine samples (prefix shared by the group, paged KV, native CPU kernels), the
  trainer updates on packed sequences (each group's prompt computed once, its responses as branches; a second
  row without that sharing), `LLM.update_weights` syncs the engine;
- transformers: `generate(num_return_sequences=G)` on the left-padded prompt batch, then the same token loss
  on the padded [P·G, L] batch and an AdamW step on the same model (no sync needed) — the loop a transformers
  user writes (TRL's GRPOTrainer does the same without vLLM).

    python bench/rl.py [--ckpt DIR] [--prompts 4] [--group 8] [--prompt-tokens 256] [--max-tokens 128] [--iters 3]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, print_table, small_checkpoint, write_json  # noqa: E402


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reward(text: str, answer=None) -> float:
    return float(zlib.crc32(text.encode()) % 2)


def make_prompts(tokenizer, n: int, tokens: int, seed: int = 0) -> list[list[dict]]:
    words = [w for w in (tokenizer.decode([i]).strip() for i in range(200, 2000)) if w.isalpha()]
    rng = random.Random(seed)
    out = []
    for i in range(n):
        text = f"Problem {i}:"
        while len(tokenizer.encode(text)) < tokens:
            text += " " + rng.choice(words)
        out.append([{"role": "user", "content": text}])
    return out


def run_ours(ckpt: Path, conversations, args, share_prompt: bool = True) -> dict:
    from step3vl.engine import LLM
    from step3vl.loader import load_model
    from step3vl.train import OptimConfig, RLConfig, RLPrompt, RLTrainer

    cfg = RLConfig(optim=OptimConfig(lr=1e-5, weight_decay=0.0), group_size=args.group, max_tokens=args.max_tokens,
                   total_steps=args.iters, truncated_reward=None, max_tokens_per_batch=16384,
                   share_prompt=share_prompt)
    llm = LLM(ckpt, kv_cache_memory="1GiB")  # on a GPU: bf16 with the Triton/CUDA kernels
    trainer = RLTrainer(load_model(ckpt, dtype=torch.float32, device=llm.model.device), llm, reward, cfg)
    prompts = [RLPrompt(c, None, id=str(i)) for i, c in enumerate(conversations)]
    rows = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        log = trainer.step(prompts)
        rows.append({"seconds": time.perf_counter() - t0, "rollout_s": log.rollout_seconds,
                     "update_s": log.update_seconds, "sync_s": log.sync_seconds, "tokens": log.response_tokens})
    return {"iters": rows}


def run_hf(ckpt: Path, conversations, args) -> dict:
    from engine import hf_model  # bench/engine.py: transformers Qwen3 with the checkpoint's decoder weights

    from step3vl.processor import Step3VLProcessor
    from step3vl.train.rl import group_advantages

    proc = Step3VLProcessor.from_pretrained(ckpt)
    tok = proc.tokenizer
    eos = list(tok.eos_token_ids)
    prompts = [proc(c).input_ids for c in conversations]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = hf_model(ckpt, torch.float32).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0)
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=dev)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=dev)
    rows = []
    for it in range(args.iters):
        _sync()
        t0 = time.perf_counter()
        model.eval()
        with torch.inference_mode():
            seqs = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.max_tokens, do_sample=True,
                                  num_return_sequences=args.group, pad_token_id=0, eos_token_id=eos)
        t1 = time.perf_counter()
        seqs = seqs.clone()
        resp = seqs[:, width:]
        # Response tokens up to and including the first eos.
        is_eos = torch.isin(resp, torch.tensor(eos, device=dev))
        after_eos = (is_eos.cumsum(1) - is_eos.int()) > 0
        resp_mask = ~after_eos
        texts = [tok.decode(r[m].tolist(), skip_special_tokens=True) for r, m in zip(resp, resp_mask)]
        rewards = torch.tensor([reward(t) for t in texts], dtype=torch.float64).view(len(prompts), args.group)
        adv = group_advantages(rewards).view(-1, 1).float().to(dev)
        model.train()
        full_mask = torch.cat([mask.repeat_interleave(args.group, 0), resp_mask.long()], 1)
        logits = model(input_ids=seqs, attention_mask=full_mask).logits[:, width - 1:-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, resp[..., None])[..., 0]
        loss = -(adv * logp * resp_mask).sum() / resp_mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync()
        rows.append({"seconds": time.perf_counter() - t0, "rollout_s": t1 - t0, "update_s": time.perf_counter() - t1,
                     "sync_s": 0.0, "tokens": int(resp_mask.sum())})
    return {"iters": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", type=Path, default=None)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--out", default="rl")
    args = ap.parse_args()
    ckpt = small_checkpoint(args.ckpt)
    from step3vl.processor import Step3VLProcessor

    torch.manual_seed(0)
    conversations = make_prompts(Step3VLProcessor.from_pretrained(ckpt).tokenizer, args.prompts, args.prompt_tokens)
    results = {"ours": run_ours(ckpt, conversations, args),
               "ours, no prompt sharing": run_ours(ckpt, conversations, args, share_prompt=False),
               "transformers": run_hf(ckpt, conversations, args)}
    rows = []
    for side, r in results.items():
        timed = r["iters"][1:] or r["iters"]  # the first iteration warms up
        secs = sum(x["seconds"] for x in timed)
        rows.append({"side": side, "iters timed": len(timed), "s/iter": secs / len(timed),
                     "rollout s/iter": sum(x["rollout_s"] for x in timed) / len(timed),
                     "update s/iter": sum(x["update_s"] for x in timed) / len(timed),
                     "sync s/iter": sum(x["sync_s"] for x in timed) / len(timed),
                     "response tok/s": sum(x["tokens"] for x in timed) / secs})
    ratio = rows[0]["response tok/s"] / rows[-1]["response tok/s"]
    print_table(rows, list(rows[0]))
    print(f"\nRL iteration throughput (response tokens/s) ours / transformers: {ratio:.2f}x")
    path = write_json(args.out, {"env": environment(), "ckpt": str(ckpt), "rows": rows, "ratio": ratio,
                                 "raw": results, "args": {k: str(v) for k, v in vars(args).items()}})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

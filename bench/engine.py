"""Engine throughput and KV memory against transformers on the same weights, same run.

Workload A (PaCoRe-shaped): one 1024-token prompt, n=16 samples × 256 new tokens (ignore_eos).
Workload B: 64 prompts of 64–1024 tokens, n=1, 128 new tokens each (transformers: padded batches).

    python bench/engine.py [--ckpt DIR] [--workload A|B|AB] [--out bench/out/engine.json] [--quick]

Uses the `small` preset (random weights, ~50M-parameter decoder); made under bench/out/ckpt-small if absent.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import Qwen3Config, Qwen3ForCausalLM

from step3vl import LLM, SamplingParams
from step3vl.tools.make_tiny_checkpoint import make_tiny_checkpoint


def hf_model(ckpt: Path, dtype: torch.dtype) -> Qwen3ForCausalLM:
    text = json.loads((ckpt / "config.json").read_text())["text_config"]
    cfg = Qwen3Config(**{k: v for k, v in text.items() if k not in ("model_type", "torch_dtype")})
    model = Qwen3ForCausalLM(cfg)
    state = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        state.update({k: v for k, v in load_file(f).items() if k.startswith(("model.", "lm_head."))
                      and not k.startswith("model.vision")})
    model.load_state_dict(state, strict=True)
    return model.to(dtype).eval()


def cache_bytes(cache) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def hf_generate(model, batch: list[list[int]], new_tokens: int, num_return: int, pad_id: int):
    """Left-padded batch generate; returns (seconds, ttft seconds, peak KV bytes)."""
    width = max(len(p) for p in batch)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
    t0 = time.perf_counter()
    with torch.inference_mode():
        first = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, min_new_tokens=1,
                               do_sample=True, num_return_sequences=num_return, pad_token_id=pad_id)
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=True, num_return_sequences=num_return,
                             pad_token_id=pad_id, return_dict_in_generate=True)
    seconds = time.perf_counter() - t0
    assert out.sequences.shape[1] == width + new_tokens
    return seconds, ttft, cache_bytes(out.past_key_values)


def warm_up(llm: LLM, vocab: int) -> None:
    """A short unrelated request first (thread pools, first-touch pages), as transformers gets its TTFT call;
    its blocks do not share a prefix with the measured prompts, and the counters are reset after it."""
    rng = random.Random(99)
    llm.generate([[rng.randrange(10, vocab - 10) for _ in range(64)]], SamplingParams(n=2, max_tokens=4, seed=1),
                 use_tqdm=False)
    llm.reset_stats()


def ours(llm: LLM, prompts: list[list[int]], params: SamplingParams):
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    ttft = min(o.metrics["time_to_first_token"] for o in outs)
    n_tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return seconds, ttft, n_tokens, llm.kv_stats()


def workload_a(ckpt: Path, quick: bool, dtype: torch.dtype) -> dict:
    n, new, plen = (4, 32, 256) if quick else (16, 256, 1024)
    rng = random.Random(0)
    vocab = json.loads((ckpt / "config.json").read_text())["text_config"]["vocab_size"]
    prompt = [rng.randrange(10, vocab - 10) for _ in range(plen)]
    llm = LLM(ckpt, dtype=dtype, kv_cache_memory="1GiB")
    warm_up(llm, vocab)
    t, ttft, tokens, kv = ours(llm, [prompt], SamplingParams(n=n, max_tokens=new, ignore_eos=True, seed=0))
    per_token = kv["bytes_per_block"] // kv["block_size"]
    ideal = (plen + n * new) * per_token
    del llm
    hf = hf_model(ckpt, dtype)
    ht, httft, hkv = hf_generate(hf, [prompt], new, n, pad_id=0)
    return dict(workload="A", dtype=str(dtype), samples=n, prompt_tokens=plen, new_tokens=new,
                ours_s=t, ours_tok_s=tokens / t, ours_ttft_s=ttft, ours_peak_kv_bytes=kv["peak_bytes_in_use"],
                ideal_kv_bytes=ideal, kv_over_ideal=kv["peak_bytes_in_use"] / ideal,
                hf_s=ht, hf_tok_s=n * new / ht, hf_ttft_s=httft, hf_kv_bytes=hkv,
                speedup=(tokens / t) / (n * new / ht), kv_ratio_hf_over_ours=hkv / kv["peak_bytes_in_use"])


def workload_b(ckpt: Path, quick: bool, dtype: torch.dtype) -> dict:
    count, new, hf_batch = (8, 16, 4) if quick else (64, 128, 16)
    rng = random.Random(1)
    vocab = json.loads((ckpt / "config.json").read_text())["text_config"]["vocab_size"]
    prompts = [[rng.randrange(10, vocab - 10) for _ in range(rng.randint(64, 1024))] for _ in range(count)]
    llm = LLM(ckpt, dtype=dtype, kv_cache_memory="2GiB")
    warm_up(llm, vocab)
    t, ttft, tokens, kv = ours(llm, prompts, SamplingParams(max_tokens=new, ignore_eos=True, seed=0))
    del llm
    hf = hf_model(ckpt, dtype)
    ht, hkv = 0.0, 0
    for i in range(0, count, hf_batch):
        s, _, b = hf_generate(hf, prompts[i:i + hf_batch], new, 1, pad_id=0)
        ht, hkv = ht + s, max(hkv, b)
    return dict(workload="B", dtype=str(dtype), prompts=count, new_tokens=new, hf_batch=hf_batch, ours_s=t, ours_tok_s=tokens / t,
                ours_ttft_s=ttft, ours_peak_kv_bytes=kv["peak_bytes_in_use"], hf_s=ht, hf_tok_s=count * new / ht,
                hf_peak_kv_bytes=hkv, speedup=(tokens / t) / (count * new / ht))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", type=Path, default=Path("bench/out/ckpt-small"))
    ap.add_argument("--workload", default="AB")
    ap.add_argument("--out", type=Path, default=Path("bench/out/engine.json"))
    ap.add_argument("--quick", action="store_true", help="small shapes, for a smoke run")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="both engines run in this dtype (bf16 uses AMX/AVX512-BF16 where the CPU has it)")
    args = ap.parse_args()
    if not (args.ckpt / "config.json").exists():
        make_tiny_checkpoint(args.ckpt, "small")
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    results = []
    if "A" in args.workload:
        results.append(workload_a(args.ckpt, args.quick, dtype))
    if "B" in args.workload:
        results.append(workload_b(args.ckpt, args.quick, dtype))
    print(f"torch threads: {torch.get_num_threads()}, device: cpu")
    for r in results:
        print(f"\nworkload {r['workload']}")
        for k, v in r.items():
            print(f"  {k:24s} {v:.4g}" if isinstance(v, float) else f"  {k:24s} {v}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(date=time.strftime("%Y-%m-%d"), results=results), indent=2))


if __name__ == "__main__":
    main()

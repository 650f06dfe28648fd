"""PaCoRe in the engine against an official-client-like baseline on the same engine, same run.

Workload: 8 problems with ~1024-token prompts, rounds [8] then the final round of one, 128 new tokens per
trajectory (ignore_eos), messages bounded to 64 tokens, `small` preset (random weights). Random weights never
write `</think>`, so a logits processor forces it at a fixed position (and keeps sampling to ids the
tokenizer decodes, so messages survive the text round trip).

- ours: pacore.PaCoRe: each round one request with n = K (one prefill, forked samples), every problem
  moves on as soon as its own round is done.
- baseline: what the official HTTP client makes a server do: one request per trajectory (n = 1), a
  per-problem barrier each round, and no prefix reuse (each request gets its own prefix-cache salt, as if
  every request landed on a cold cache). Same compaction, template and chat template as ours.

    python bench/pacore.py [--ckpt DIR] [--problems 8] [--prompt-tokens 1024] [--k 8] [--max-tokens 128]
                           [--message-max-tokens 64] [--only ours|baseline] [--quick]

Reports wall time, prefill tokens computed and peak KV for both and their ratios; JSON under bench/out/.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

# This file is named like the package it measures: take its folder off the path before importing `pacore`.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
from step3vl_pacore import PaCoRe, PaCoReConfig, Problem  # noqa: E402
from step3vl_pacore.compaction import compact_round, order_trajectories, passed_on  # noqa: E402
from step3vl_pacore.seeds import round_seed, think_end_marker  # noqa: E402
from step3vl_pacore.template import synthesis_messages  # noqa: E402
from step3vl import LLM, SamplingParams  # noqa: E402
from step3vl.cli import RandomWeightsProcessor  # noqa: E402

sys.path.append(str(_HERE))
from _common import environment, make_problems, print_table, small_checkpoint, write_json  # noqa: E402

def new_llm(args) -> LLM:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    use_kernels = {"auto": None, "on": True, "off": False}[args.use_kernels]
    cascade = {"auto": None, "on": True, "off": False}[args.cascade]
    return LLM(args.ckpt, dtype=args.dtype, device=args.device, kv_cache_memory=args.kv_cache_memory,
               max_num_seqs=args.max_num_seqs, use_kernels=use_kernels, cascade_attention=cascade)


def processor_for(llm: LLM, args) -> RandomWeightsProcessor:
    think_at = args.max_tokens - args.message_max_tokens - 1  # the message fills the bound exactly
    return RandomWeightsProcessor(llm.get_tokenizer(), llm.model.cfg.text.vocab_size, think_at)


def params_for(proc, n: int, seed: int, args) -> SamplingParams:
    return SamplingParams(n=n, temperature=1.0, top_p=1.0, max_tokens=args.max_tokens, seed=seed, ignore_eos=True,
                          logits_processors=[proc])


# -- ours -------------------------------------------------------------------------------------------

def run_ours(llm: LLM, problems: list[Problem], args) -> dict:
    proc = processor_for(llm, args)

    def hook(pid, r, params):
        params.logits_processors, params.ignore_eos = [proc], True
        return params

    cfg = PaCoReConfig(rounds=[args.k], max_tokens=args.max_tokens, message_max_tokens=args.message_max_tokens,
                       seed=args.seed, sampling_hook=hook)
    t0 = time.perf_counter()
    done = {}
    for res in PaCoRe(llm, cfg).run_iter(problems):
        done[res.request_id] = (time.perf_counter() - t0, res)
    wall = time.perf_counter() - t0
    errors = [r.error for _, r in done.values() if r.error]
    if errors:
        raise RuntimeError(f"ours: {errors[:3]}")
    return {"wall_s": wall, "latency_s": sorted(t for t, _ in done.values()),
            "tokens_generated": sum(r.effective_ttc for _, r in done.values()),
            "round_prompt_tokens": [[s.prompt_tokens for s in r.rounds] for _, r in done.values()]}


# -- the official-client-like baseline --------------------------------------------------------------

def run_baseline(llm: LLM, problems: list[Problem], args) -> dict:
    """One n=1 request per trajectory, per-problem barrier each round, a unique prefix-cache salt per request."""
    proc = processor_for(llm, args)
    tok = llm.get_tokenizer()
    marker = think_end_marker(tok)
    schedule = [args.k, 1]
    salts = iter(range(1, 1 << 40))
    owner: dict[str, tuple[str, int]] = {}  # request id -> (problem id, trajectory)
    state = {p.id: {"round": 0, "outs": {}, "tokens": 0, "prompts": []} for p in problems}
    by_id = {p.id: p for p in problems}

    def submit(pid: str, r: int, messages: list[dict]) -> None:
        text, images = llm.processor.apply_chat_template(messages)
        ids = llm.processor.process(text, images).input_ids
        st = state[pid]
        st["round"], st["outs"] = r, {}
        st["prompts"].append(len(ids))
        for j in range(schedule[r]):
            rid = f"{pid}/r{r}/t{j}"
            seed = round_seed(args.seed, f"{pid}/{j}", r)
            llm.add_request({"prompt_token_ids": ids, "cache_salt": str(next(salts))}, params_for(proc, 1, seed, args),
                            request_id=rid)
            owner[rid] = (pid, j)

    t0 = time.perf_counter()
    for p in problems:
        submit(p.id, 0, p.messages)
    done, latency = set(), []
    while len(done) < len(problems):
        for out in llm.step():
            if not out.finished or out.request_id not in owner:
                continue
            pid, j = owner.pop(out.request_id)
            st = state[pid]
            sample = out.outputs[0]
            sample.index = j
            st["outs"][j] = sample
            st["tokens"] += len(sample.token_ids)
            r = st["round"]
            if len(st["outs"]) < schedule[r]:
                continue  # the barrier: wait for this problem's slowest trajectory
            samples = [st["outs"][i] for i in range(schedule[r])]
            if r == len(schedule) - 1:
                done.add(pid)
                latency.append(time.perf_counter() - t0)
                continue
            trajs = compact_round(samples, tok, marker, args.message_max_tokens, "drop", llm.model.device)
            messages = passed_on(order_trajectories(trajs, args.seed))
            if not messages:
                raise RuntimeError(f"baseline: problem {pid} round {r + 1} yielded no message")
            submit(pid, r + 1, synthesis_messages(by_id[pid].messages, messages))
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "latency_s": sorted(latency), "tokens_generated": sum(s["tokens"] for s in state.values()),
            "round_prompt_tokens": [s["prompts"] for s in state.values()]}


# -- driver -----------------------------------------------------------------------------------------

def measure(name: str, fn, args, problems) -> dict:
    llm = new_llm(args)
    if args.warmup:  # first-call costs (Triton compilation on GPU, allocator) out of the timed run
        warm = problems[:1]
        fn(llm, warm, argparse.Namespace(**{**vars(args), "max_tokens": 8, "message_max_tokens": 4}))
        llm = new_llm(args)  # fresh counters (peak KV, prefill tokens) for the timed run
    if llm.model.device.type == "cuda":
        torch.cuda.synchronize()
    step_times = []
    engine_step = llm.step

    def timed_step():  # each step ends in a host read of the sampled ids, so wall time per step is honest
        t = time.perf_counter()
        out = engine_step()
        step_times.append(time.perf_counter() - t)
        return out

    llm.step = timed_step
    out = fn(llm, problems, args)
    out.update(engine_steps=len(step_times), engine_step_s=sum(step_times),
               mean_step_ms=1e3 * sum(step_times) / max(len(step_times), 1))
    s = llm.kv_stats()
    out.update(name=name, prefill_tokens=s["prefill_tokens_computed"], decode_tokens=s["decode_tokens_computed"],
               prefix_hit_tokens=s["prefix_hit_tokens"], peak_kv_blocks=s["peak_blocks_used"],
               peak_kv_mib=s["peak_bytes_in_use"] / 2**20, preemptions=s["preemptions"], forks=s["forks"])
    out["tok_per_s"] = out["tokens_generated"] / out["wall_s"]
    del llm
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", type=Path, default=None, help="checkpoint (default: the cached `small` preset)")
    ap.add_argument("--problems", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=1024)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--message-max-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--only", choices=["ours", "baseline"], default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default=None)
    ap.add_argument("--kv-cache-memory", default="3GiB")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--use-kernels", choices=["auto", "on", "off"], default="auto",
                    help="engine attention: Triton kernels (on, the CUDA default) or the torch path (off)")
    ap.add_argument("--cascade", choices=["auto", "on", "off"], default="auto",
                    help="shared-prefix cascade decode kernel on CUDA (auto: the engine's default)")
    ap.add_argument("--no-warmup", dest="warmup", action="store_false")
    ap.add_argument("--quick", action="store_true", help="2 problems, 256-token prompts, K=4, 32 new tokens")
    ap.add_argument("--out", default=None, help="JSON name under bench/out/ (default pacore-<device>)")
    args = ap.parse_args(argv)
    if args.quick:
        args.problems, args.prompt_tokens, args.k, args.max_tokens, args.message_max_tokens = 2, 256, 4, 32, 16
    if args.threads:
        torch.set_num_threads(args.threads)
    args.ckpt = small_checkpoint(args.ckpt)
    probe = new_llm(args)
    problems = make_problems(probe.get_tokenizer(), args.problems, args.prompt_tokens, args.seed)
    device = str(probe.model.device)
    gpu = torch.cuda.get_device_name() if probe.model.device.type == "cuda" else None
    del probe
    runs = []
    if args.only in (None, "ours"):
        runs.append(measure("ours", run_ours, args, problems))
    if args.only in (None, "baseline"):
        runs.append(measure("baseline", run_baseline, args, problems))
    cols = ["name", "wall_s", "tok_per_s", "tokens_generated", "prefill_tokens", "prefix_hit_tokens",
            "peak_kv_blocks", "peak_kv_mib", "preemptions", "engine_steps", "mean_step_ms"]
    print_table(runs, cols)
    payload = {"workload": {k: getattr(args, k) for k in ("problems", "prompt_tokens", "k", "max_tokens",
                                                         "message_max_tokens", "seed", "kv_cache_memory")},
               "use_kernels": args.use_kernels, "cascade": args.cascade, "checkpoint": str(args.ckpt), "device": device, "gpu": gpu, "environment": environment(),
               "runs": runs}
    if len(runs) == 2:
        ours, base = runs
        payload["ratios"] = {"wall_speedup": base["wall_s"] / ours["wall_s"],
                             "prefill_tokens_ratio": base["prefill_tokens"] / ours["prefill_tokens"],
                             "peak_kv_ratio": base["peak_kv_blocks"] / ours["peak_kv_blocks"]}
        print("baseline / ours: " + ", ".join(f"{k} {v:.2f}x" for k, v in payload["ratios"].items()))
    path = write_json(args.out or f"pacore-{device.split(':')[0]}{'-quick' if args.quick else ''}", payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

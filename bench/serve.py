"""`step3vl serve` against the ways a user would otherwise drive the same engine, same run, same machine.

1. HTTP overhead: --requests concurrent chat requests (n=1, ~--prompt-tokens prompts, --max-tokens new tokens,
   ignore_eos) sent by the official `openai` AsyncOpenAI client to the server, against the same requests
   through `LLM.generate` in process.
2. PaCoRe over HTTP: the official PaCoRe client's way — one n=1 chat request per trajectory, a barrier per
   problem each round, the message = the response's `content` (text after `</think>`), sorted by length and
   shuffled with seed 42, the synthesis template — against one `POST /v1/pacore` on the same server (a round
   is one n=K request; a problem moves on as soon as its own round is done).

Random weights never write `</think>`: the server forces it at a fixed output position for every request
(`ServerConfig.logits_processors`, what `step3vl serve --think-at` sets), on both sides.

    python bench/serve.py [--ckpt DIR] [--requests 16] [--prompt-tokens 256] [--max-tokens 64]
                          [--problems 4] [--k 8] [--pacore-max-tokens 96] [--message-max-tokens 32] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from pathlib import Path

import torch

# This folder has a pacore.py: take it off the path before importing the `pacore` package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
import httpx  # noqa: E402
import openai  # noqa: E402

from step3vl_pacore import PaCoReConfig  # noqa: E402
from step3vl_pacore.seeds import round_seed  # noqa: E402
from step3vl_pacore.serve import PaCoReService  # noqa: E402
from step3vl_pacore.template import synthesis_messages  # noqa: E402
from step3vl import LLM, SamplingParams  # noqa: E402
from step3vl.cli import RandomWeightsProcessor  # noqa: E402
from step3vl.engine import AsyncLLM  # noqa: E402
from step3vl.serve import OpenAIServer, ServerConfig  # noqa: E402
from step3vl.serve.background import BackgroundServer  # noqa: E402

sys.path.append(str(_HERE))
from _common import environment, make_problems, print_table, small_checkpoint, write_json  # noqa: E402

MODEL = "small"
OFFICIAL = "official client (n=1 per trajectory)"


def new_llm(args) -> LLM:
    return LLM(args.ckpt, kv_cache_memory=args.kv_cache_memory)


def think_processor(llm: LLM, think_at: int) -> RandomWeightsProcessor:
    return RandomWeightsProcessor(llm.get_tokenizer(), llm.model.cfg.text.vocab_size, think_at)


# -- 1. HTTP overhead ---------------------------------------------------------------------------------

def overhead_in_process(args, problems) -> dict:
    llm = new_llm(args)
    proc = think_processor(llm, args.max_tokens // 2)
    msgs = [p.messages for p in problems]
    params = [SamplingParams(seed=i, max_tokens=args.max_tokens, ignore_eos=True, logits_processors=[proc])
              for i in range(len(msgs))]
    llm.chat(msgs[:1], params[0], use_tqdm=False)  # warm-up
    prompts = [{"prompt": llm.processor.apply_chat_template(m)[0]} for m in msgs]
    steps = llm.engine.counters.steps
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    return {"name": "in-process LLM.generate", "wall_s": wall, "engine_steps": llm.engine.counters.steps - steps,
            "tokens_generated": sum(len(o.outputs[0].token_ids) for o in outs)}


async def _chat_all(url: str, problems, args) -> int:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=3600)
    rs = await asyncio.gather(*(client.chat.completions.create(
        model=MODEL, messages=p.messages, seed=i, max_tokens=args.max_tokens, extra_body={"ignore_eos": True})
        for i, p in enumerate(problems)))
    await client.close()
    return sum(r.usage.completion_tokens for r in rs)


def overhead_http(args, problems) -> dict:
    llm = new_llm(args)
    engine = AsyncLLM(llm)
    srv = OpenAIServer(engine, ServerConfig(MODEL, logits_processors=[think_processor(llm, args.max_tokens // 2)]))
    with BackgroundServer(srv.app) as url:
        asyncio.run(_chat_all(url, problems[:1], args))  # warm-up
        steps = llm.engine.counters.steps
        t0 = time.perf_counter()
        tokens = asyncio.run(_chat_all(url, problems, args))
        wall = time.perf_counter() - t0
    engine.shutdown()
    return {"name": "HTTP, openai client", "wall_s": wall, "engine_steps": llm.engine.counters.steps - steps,
            "tokens_generated": tokens}


# -- 2. PaCoRe over HTTP ------------------------------------------------------------------------------

class PaCoReServer:
    """A fresh server (engine, prefix cache, counters) for each PaCoRe side: neither finds the other's prompts
    cached."""

    def __init__(self, args):
        llm = new_llm(args)
        self.think_at = args.pacore_max_tokens - args.message_max_tokens - 1
        self.engine = AsyncLLM(llm)
        srv = OpenAIServer(self.engine, ServerConfig(MODEL, logits_processors=[think_processor(llm, self.think_at)]))
        PaCoReService(srv, PaCoReConfig(max_tokens=args.pacore_max_tokens,
                                        message_max_tokens=args.message_max_tokens), [])
        self.http = BackgroundServer(srv.app)

    def kv(self, reset: bool = False) -> dict:
        return asyncio.run(self.engine.call(lambda llm: llm.reset_stats() if reset else llm.kv_stats()))


async def _official_problem(client, problem, schedule: list[int], args) -> int:
    """The official client's loop for one problem; returns the tokens it generated."""
    messages, tokens = problem.messages, 0
    original = problem.messages[-1]["content"]
    for r, k in enumerate(schedule):
        rs = await asyncio.gather(*(client.chat.completions.create(
            model=MODEL, messages=messages, temperature=1.0, top_p=1.0, max_tokens=args.pacore_max_tokens,
            seed=round_seed(args.seed, f"{problem.id}/{j}", r)) for j in range(k)))  # the barrier
        tokens += sum(x.usage.completion_tokens for x in rs)
        if r == len(schedule) - 1:
            return tokens
        refs = sorted((x.choices[0].message.content or "" for x in rs), key=len)
        random.Random(42).shuffle(refs)
        refs = [m for m in refs if m.strip()]
        messages = synthesis_messages(problem.messages, refs, original)
    return tokens


async def _official_all(url: str, problems, args) -> int:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=3600)
    counts = await asyncio.gather(*(_official_problem(client, p, [args.k, 1], args) for p in problems))
    await client.close()
    return sum(counts)


def pacore_side(name: str, problems, warmup, args) -> dict:
    server = PaCoReServer(args)
    with server.http as url:
        warm = argparse.Namespace(**{**vars(args), "k": 2})
        _run_side(url, name, [warmup], warm)  # first-call costs out of the timed run, on another prompt
        server.kv(reset=True)
        t0 = time.perf_counter()
        tokens = _run_side(url, name, problems, args)
        wall = time.perf_counter() - t0
    s = server.kv()
    server.engine.shutdown()
    return {"name": name, "wall_s": wall, "tokens_generated": tokens, "prefill_tokens": s["prefill_tokens_computed"],
            "prefix_hit_tokens": s["prefix_hit_tokens"], "peak_kv_blocks": s["peak_blocks_used"]}


def _run_side(url: str, name: str, problems, args) -> int:
    if name == OFFICIAL:
        return asyncio.run(_official_all(url, problems, args))
    body = {"problems": [{"id": p.id, "messages": p.messages} for p in problems], "rounds": [args.k],
            "seed": args.seed}
    data = httpx.post(url + "/v1/pacore", json=body, timeout=3600).json()["data"]
    errors = [d["error"] for d in data if d["error"]]
    if errors:
        raise RuntimeError(f"PaCoRe errors: {errors[:3]}")
    return sum(d["effective_ttc"] for d in data)


# -- driver -------------------------------------------------------------------------------------------

def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", type=Path, default=None, help="checkpoint (default: the cached `small` preset)")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--problems", type=int, default=4)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--pacore-max-tokens", type=int, default=96)
    ap.add_argument("--message-max-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--kv-cache-memory", default="2GiB")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="4 requests, 2 problems, K=4, short outputs")
    args = ap.parse_args(argv)
    if args.quick:
        args.requests, args.max_tokens, args.problems, args.k = 4, 16, 2, 4
        args.pacore_max_tokens, args.message_max_tokens = 24, 8
    if args.threads:
        torch.set_num_threads(args.threads)
    args.ckpt = small_checkpoint(args.ckpt)
    tok = LLM(args.ckpt, kv_cache_memory="64MiB").get_tokenizer()
    chats = make_problems(tok, args.requests, args.prompt_tokens, args.seed)
    overhead = [overhead_in_process(args, chats), overhead_http(args, chats)]
    for r in overhead:
        r["tok_per_s"] = r["tokens_generated"] / r["wall_s"]
    print_table(overhead, ["name", "wall_s", "tokens_generated", "tok_per_s", "engine_steps"])

    *problems, warmup = make_problems(tok, args.problems + 1, args.prompt_tokens, args.seed + 1)
    runs = [pacore_side(name, problems, warmup, args) for name in (OFFICIAL, "POST /v1/pacore")]
    for r in runs:
        r["tok_per_s"] = r["tokens_generated"] / r["wall_s"]
    print_table(runs, ["name", "wall_s", "tokens_generated", "tok_per_s", "prefill_tokens", "prefix_hit_tokens",
                       "peak_kv_blocks"])
    base, ours = runs
    ratios = {"http_over_in_process_wall": overhead[1]["wall_s"] / overhead[0]["wall_s"],
              "pacore_wall_speedup": base["wall_s"] / ours["wall_s"],
              "pacore_prefill_ratio": base["prefill_tokens"] / max(ours["prefill_tokens"], 1),
              "pacore_peak_kv_ratio": base["peak_kv_blocks"] / max(ours["peak_kv_blocks"], 1)}
    print(", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    payload = {"workload": {k: getattr(args, k) for k in ("requests", "prompt_tokens", "max_tokens", "problems", "k",
                                                         "pacore_max_tokens", "message_max_tokens", "seed")},
               "environment": environment(), "overhead": overhead, "pacore": runs, "ratios": ratios}
    print(f"wrote {write_json('serve' + ('-quick' if args.quick else ''), payload)}")


if __name__ == "__main__":
    main()

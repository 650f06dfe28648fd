"""`step3vl` command line: demo, pacore (one question or a JSONL batch), generate, serve, train, rl,
recipe, eval, make-checkpoint.

PaCoRe sits on top of the engine, so this module (the top of the house) imports it only inside the
commands that use it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

DEMO_DIR = Path.home() / ".cache" / "step3vl" / "demo-small"
ASSETS = Path(__file__).resolve().parent / "assets"
# The demo's default model: trained by `step3vl recipe shapes` (its model card is the README.md beside it).
SHAPES_MODEL = ASSETS / "shapes_demo"


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    if args.command is None:
        ap.print_help()
        return 2
    if getattr(args, "threads", None):
        import torch
        torch.set_num_threads(args.threads)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"step3vl {args.command}: error: {e}", file=sys.stderr)
        return 2


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("step3vl")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="step3vl", description="STEP3-VL-10B engine and PaCoRe.")
    ap.add_argument("--version", action="version", version=f"step3vl {_version()}")
    sub = ap.add_subparsers(dest="command")

    d = sub.add_parser("demo", help="PaCoRe with the bundled shapes model on the bundled picture (or your own)")
    d.add_argument("question", nargs="?", default=None,
                   help="a question about --image (default: the bundled picture's question)")
    d.add_argument("--image", type=Path, default=None, help="your own shapes picture (default: the bundled one)")
    d.add_argument("--model", type=Path, default=SHAPES_MODEL,
                   help="checkpoint (default: the bundled model trained by `step3vl recipe shapes`)")
    d.add_argument("--random", action="store_true",
                   help="instead: a small random-weight checkpoint (benchmarking the machinery; gibberish text)")
    d.add_argument("--dir", type=Path, default=DEMO_DIR, help=f"--random: checkpoint to make or reuse ({DEMO_DIR})")
    d.add_argument("--preset", default="medium", choices=["low", "medium", "high"])
    d.add_argument("--max-tokens", type=int, default=None,
                   help="new tokens per trajectory (default 128; 64 with --random)")
    d.add_argument("--message-max-tokens", type=int, default=24)
    d.add_argument("--think-at", type=int, default=None,
                   help="--random: position where </think> is forced (random weights never write it); default 3/4 "
                        "of --max-tokens")
    d.add_argument("--seed", type=int, default=42)
    d.add_argument("--show-reasoning", action="store_true")
    _engine_args(d)
    d.set_defaults(func=_cmd_demo)

    p = sub.add_parser("pacore", help="PaCoRe on one question (--image, question) or a JSONL batch (--input/--output)")
    p.add_argument("question", nargs="?", help="the question (one-problem mode)")
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--image", action="append", default=[], help="an image for the question (repeatable)")
    p.add_argument("--system", default=None, help="a system message")
    p.add_argument("--input", type=Path, help="JSONL problems in the official format (id, messages, ...)")
    p.add_argument("--output", type=Path, help="JSONL results; an existing file is resumed")
    p.add_argument("--retry-errors", action="store_true", help="on resume, run again the problems that failed")
    p.add_argument("--preset", default="medium", choices=["low", "medium", "high"])
    p.add_argument("--rounds", default=None, help="override the preset, e.g. 8,4 (a final round of 1 is added)")
    p.add_argument("--max-tokens", type=int, default=131072, help="new tokens per trajectory")
    p.add_argument("--message-max-tokens", type=int, default=4096, help="bound on each message passed on")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--unclosed", default="drop", choices=["drop", "keep"],
                   help="a trajectory without </think>: drop it (default) or pass its whole text on")
    p.add_argument("--max-concurrent-problems", type=int, default=None)
    p.add_argument("--show-reasoning", action="store_true", help="print the final trajectory's reasoning")
    p.add_argument("--show-rounds", action="store_true", help="print every round's messages")
    p.add_argument("--no-progress", action="store_true")
    _engine_args(p)
    p.set_defaults(func=_cmd_pacore)

    g = sub.add_parser("generate", help="plain sampling from a checkpoint")
    g.add_argument("prompt")
    g.add_argument("--model", required=True, type=Path)
    g.add_argument("--image", action="append", default=[])
    g.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    g.add_argument("--n", type=int, default=1)
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    _engine_args(g)
    g.set_defaults(func=_cmd_generate)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (chat/completions; PaCoRe models beside the base)")
    s.add_argument("--model", type=Path, default=None, help="checkpoint directory (or --demo)")
    s.add_argument("--random", action="store_true",
                   help="with --demo: the random-weight demo checkpoint instead of the bundled shapes model")
    s.add_argument("--demo", action="store_true",
                   help=f"serve the demo's random-weight checkpoint ({DEMO_DIR}, made if missing) with </think> "
                        f"forced at output position 48, to try the API without real weights")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--served-model-name", default=None, help="model id clients send (default: the directory name)")
    s.add_argument("--pacore-presets", default="low,medium,high",
                   help="PaCoRe chat models <name>-pacore-<preset> to serve ('' for none)")
    s.add_argument("--pacore-max-tokens", type=int, default=None,
                   help="per-trajectory new tokens when a request names none (default: the context's room)")
    s.add_argument("--message-max-tokens", type=int, default=4096, help="bound on each message passed between rounds")
    s.add_argument("--chat-template", type=Path, default=None,
                   help="a Jinja chat template file to use instead of the checkpoint's (vLLM's flag)")
    s.add_argument("--no-reasoning-parser", action="store_true",
                   help="return the raw text as content (no reasoning_content split at </think>)")
    s.add_argument("--tool-call-parser", choices=["hermes", "none"], default="hermes",
                   help="tool calls in answers to requests with tools: hermes parses STEP3-VL's <tool_call> blocks "
                        "into tool_calls (vLLM's/SGLang's parser for it); none returns them as content")
    s.add_argument("--allowed-local-media-path", type=Path, default=None,
                   help="local image paths / file:// URLs are read only under this directory")
    s.add_argument("--no-fetch-urls", action="store_true", help="refuse http(s) image URLs (data: URLs only)")
    s.add_argument("--allow-private-urls", action="store_true",
                   help="also fetch image URLs on loopback / private addresses (off: the server's own network is "
                        "not reachable through it)")
    s.add_argument("--max-n", type=int, default=64, help="the most samples (n) one request may ask for")
    s.add_argument("--enable-sleep-mode", action="store_true",
                   help="serve POST /sleep?level=1|2, POST /wake_up, GET /is_sleeping (a colocated trainer frees "
                        "the KV pool, and at level 2 the weights, between rollouts)")
    s.add_argument("--max-pacore-trajectories", type=int, default=64,
                   help="the most trajectories, all rounds together, one PaCoRe problem may ask for")
    s.add_argument("--api-key", default=None,
                   help="require `Authorization: Bearer KEY` on /v1/* and /tokenize (default: $STEP3VL_API_KEY)")
    s.add_argument("--think-at", type=int, default=None,
                   help="random-weight checkpoints only (demos, benchmarks): every request writes </think> at this "
                        "output position and only decodable text")
    s.add_argument("--log-level", default="info")
    _engine_args(s)
    s.set_defaults(func=_cmd_serve)

    t = sub.add_parser("train", help="next-token training (image-text / chat JSONL) of a checkpoint")
    t.add_argument("--model", required=True, type=Path, help="the checkpoint to start from")
    t.add_argument("--data", required=True, type=Path,
                   help='JSONL: {"messages": [...]} (loss on assistant turns) or {"text": ..., "images": [...]}')
    t.add_argument("--out", required=True, type=Path, help="where to write the trained checkpoint")
    t.add_argument("--epochs", type=int, default=1)
    t.add_argument("--max-steps", type=int, default=None)
    t.add_argument("--max-tokens-per-batch", type=int, default=8192)
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--freeze-vision", action="store_true", help="train the decoder only")
    t.add_argument("--max-seq-len", type=int, default=None,
                   help="split longer text examples into windows of this many tokens (long documents)")
    t.add_argument("--eval-data", type=Path, default=None, help="held-out JSONL examples (eval_loss in the log)")
    t.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default: at the end)")
    t.add_argument("--activation-checkpointing", action="store_true")
    _optim_args(t, lr=1e-5)
    t.set_defaults(func=_cmd_train)

    r = sub.add_parser("rl", help="RL with outcome rewards (math answers) on problems, or on PaCoRe synthesis episodes")
    r.add_argument("--model", required=True, type=Path)
    r.add_argument("--problems", required=True, type=Path, help='JSONL problems: {"id", "messages", "ground_truth"}')
    r.add_argument("--pacore-results", type=Path, default=None,
                   help="PaCoRe results JSONL (from `step3vl pacore --output`): train on synthesis episodes whose "
                        "references are drawn from these messages")
    r.add_argument("--out", required=True, type=Path)
    r.add_argument("--steps", type=int, default=10)
    r.add_argument("--batch-size", type=int, default=4, help="prompts per step")
    r.add_argument("--group-size", type=int, default=8, help="responses per prompt")
    r.add_argument("--max-tokens", type=int, default=1024, help="new tokens per response")
    r.add_argument("--temperature", type=float, default=1.0)
    r.add_argument("--ppo-epochs", type=int, default=1)
    r.add_argument("--clip-eps", type=float, default=0.2)
    r.add_argument("--advantage", default="grpo", choices=["grpo", "mean"])
    r.add_argument("--truncated-reward", type=float, default=0.0,
                   help="reward of a response cut off at --max-tokens (default 0)")
    r.add_argument("--max-tokens-per-batch", type=int, default=16384, help="packed tokens per update micro-batch")
    r.add_argument("--kl-coef", type=float, default=0.0,
                   help="KL penalty towards the starting policy (default 0, as PaCoRe trains)")
    r.add_argument("--engine-is-cap", type=float, default=None,
                   help="weight token losses by min(p_policy / p_engine, CAP): corrects a bf16 sampler vs fp32 policy")
    r.add_argument("--engine-sleep-level", type=int, choices=[1, 2], default=None,
                   help="the engine sleeps through each update: 1 frees its KV pool, 2 also its copy of the weights")
    r.add_argument("--eval-problems", type=Path, default=None,
                   help="held-out problems (same format): mean reward logged as eval_reward")
    r.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default: at the end)")
    r.add_argument("--eval-samples", type=int, default=1, help="responses per held-out problem")
    r.add_argument("--min-refs", type=int, default=16)
    r.add_argument("--max-refs", type=int, default=24)
    _optim_args(r, lr=1e-6)
    r.add_argument("--kv-cache-memory", default=None, help="the rollout engine's KV pool, e.g. 2GiB")
    r.set_defaults(func=_cmd_rl)

    rc = sub.add_parser("recipe", help="train a model end to end: `recipe shapes` (see pacore/recipes/shapes.py)")
    rc.add_argument("task", choices=["shapes"])
    rc.add_argument("--out", type=Path, required=True, help="the run's directory (an existing one is resumed)")
    rc.add_argument("--seed", type=int, default=0)
    rc.add_argument("--stages", default=None, help="comma-separated subset of init,pretrain,rl,pools,synthesis,eval")
    rc.add_argument("--pretrain-examples", type=int, default=None,
                    help="pre-training problems (default: the recipe's 60,000; a resumed run needs the same value)")
    rc.add_argument("--toy", action="store_true", help="every stage at toy size (a smoke test, well under a minute)")
    rc.add_argument("--export", type=Path, default=None,
                    help="after the stages, copy the final checkpoint here with its model card and plots "
                         "(step3vl/assets/shapes_demo ships it as the demo's model)")
    rc.add_argument("--export-checkpoint", default="synthesis", choices=["rl", "synthesis"],
                    help="which stage's checkpoint --export copies")
    rc.add_argument("--device", default=None)
    rc.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    rc.set_defaults(func=_cmd_recipe)

    ev = sub.add_parser("eval", help="evaluate a checkpoint: `eval shapes` (greedy, single, self-consistency, PaCoRe)")
    ev.add_argument("task", choices=["shapes"])
    ev.add_argument("--model", type=Path, default=SHAPES_MODEL, help="checkpoint (default: the bundled model)")
    ev.add_argument("--problems", type=int, default=500, help="held-out problems (seeds 0..N-1, N <= 500)")
    ev.add_argument("--samples", type=int, default=16, help="samples per problem (single and self-consistency)")
    ev.add_argument("--max-tokens", type=int, default=128, help="new tokens per trajectory")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--out", type=Path, default=None, help="write the JSON report here (and a PNG plot beside it)")
    _engine_args(ev)
    ev.set_defaults(func=_cmd_eval)

    m = sub.add_parser("make-checkpoint", help="write a random-weight checkpoint in the official format")
    m.add_argument("dir", type=Path)
    m.add_argument("--preset", default="tiny", choices=["tiny", "small", "small-vl", "shapes", "shapes-tiny"])
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(func=_cmd_make_checkpoint)

    pm = sub.add_parser("plan-memory", help="per-rank memory plan of FSDP training of STEP3-VL-10B (fake process group)")
    pm.add_argument("--world-sizes", default="8,16,64", help="comma-separated data-parallel world sizes")
    pm.add_argument("--tokens", default="4096,8192,16384", help="comma-separated tokens per micro-batch")
    pm.add_argument("--images", type=int, default=1, help="728-px images in each micro-batch")
    pm.add_argument("--no-mixed-precision", action="store_true", help="fp32 working set and activations")
    pm.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    pm.set_defaults(func=_cmd_plan_memory)
    return ap


def _engine_args(p: argparse.ArgumentParser) -> None:
    e = p.add_argument_group("engine")
    e.add_argument("--dtype", default="auto")
    e.add_argument("--device", default=None)
    e.add_argument("--kv-cache-memory", default=None, help="e.g. 2GiB (default: 60%% of free GPU memory, 1GiB on CPU)")
    e.add_argument("--max-model-len", type=int, default=None)
    e.add_argument("--block-size", type=int, default=16, help="tokens per KV block (a power of two)")
    e.add_argument("--max-num-seqs", type=int, default=256, help="sequences per engine step")
    e.add_argument("--max-num-batched-tokens", type=int, default=None, help="token budget per step (chunked prefill)")
    e.add_argument("--encoder-cache-memory", default="256MiB",
                   help="image features kept by image digest, so a recurring image is encoded once")
    e.add_argument("--speculative-config", type=json.loads, default=None,
                   help='n-gram speculative decoding, e.g. \'{"method": "ngram", "num_speculative_tokens": 4}\' '
                        "(outputs are identical with and without it)")
    e.add_argument("--scheduling-policy", choices=["fcfs", "priority"], default="fcfs",
                   help="priority: requests' `priority` (lower first) orders admission and preemption")
    e.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def _optim_args(p: argparse.ArgumentParser, lr: float) -> None:
    o = p.add_argument_group("optimizer")
    o.add_argument("--lr", type=float, default=lr)
    o.add_argument("--warmup-steps", type=int, default=0)
    o.add_argument("--weight-decay", type=float, default=0.0)
    o.add_argument("--max-grad-norm", type=float, default=1.0)
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--device", default=None)
    # "--log-file" first: under torchrun, "--log" is refused as an abbreviation of torchrun's own --log-dir.
    o.add_argument("--log-file", "--log", dest="log", type=Path, default=None,
                   help="append one JSON line per step to this file")
    o.add_argument("--save-every", type=int, default=None,
                   help="also write a resumable <out>-step<k> every k steps (DCP: sharded fp32 weights, optimizer, "
                        "schedule, sampler; loadable as a model, resumable at any number of ranks)")
    o.add_argument("--resume", type=Path, default=None,
                   help="continue from a <out>-step<k> checkpoint (same data and options as the run that wrote it)")
    o.add_argument("--save-dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="dtype of the written checkpoints (float32 keeps updates smaller than a bf16 step)")
    o.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)  # argparse choices keep it to torch dtype names


def _optim_config(args):
    from step3vl.train.optim import OptimConfig

    return OptimConfig(lr=args.lr, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
                       max_grad_norm=args.max_grad_norm)


def _load_llm(args, model: Path):
    from step3vl.engine.llm import LLM

    if not (Path(model) / "config.json").is_file():
        raise FileNotFoundError(f"no checkpoint at {model} (config.json missing)")
    return LLM(model, dtype=args.dtype, device=args.device, kv_cache_memory=args.kv_cache_memory,
               max_model_len=args.max_model_len, block_size=args.block_size, max_num_seqs=args.max_num_seqs,
               max_num_batched_tokens=args.max_num_batched_tokens, encoder_cache_memory=args.encoder_cache_memory,
               speculative_config=args.speculative_config, scheduling_policy=args.scheduling_policy)


# -- demo -------------------------------------------------------------------------------------------

def _demo_checkpoint(path: Path) -> tuple[Path, bool]:
    if (path / "config.json").is_file() and (path / "model.safetensors.index.json").is_file():
        return path, False
    from step3vl.tools.make_tiny_checkpoint import make_tiny_checkpoint
    return make_tiny_checkpoint(path, "small"), True


class RandomWeightsProcessor:
    """For random-weight checkpoints: sample only ids the tokenizer can decode to text (a padded lm_head and
    the special tokens would otherwise give mostly empty text), write `</think>` at output position
    `think_at` and nowhere else, and end (eos) only after it. A logits processor: (output_ids, logits_row) ->
    logits_row."""

    def __init__(self, tokenizer, vocab_size: int, think_at: int):
        import torch

        specials = {i for i, t in tokenizer.tok.get_added_tokens_decoder().items() if t.special}
        banned = torch.zeros(vocab_size, dtype=torch.bool)
        banned[min(tokenizer.vocab_size, vocab_size):] = True
        for i in specials - set(tokenizer.eos_token_ids):
            if i < vocab_size:
                banned[i] = True
        self.think_id, self.think_at = tokenizer.think_end_id, think_at
        banned[self.think_id] = True
        self.banned_before = banned.clone()
        self.banned_before[[i for i in tokenizer.eos_token_ids if i < vocab_size]] = True
        self.banned = banned

    def __call__(self, output_ids: list[int], logits):
        if len(output_ids) == self.think_at:
            forced = logits.new_full(logits.shape, float("-inf"))
            forced[self.think_id] = 0.0
            return forced
        if self.banned.device != logits.device:
            self.banned, self.banned_before = self.banned.to(logits.device), self.banned_before.to(logits.device)
        return logits.masked_fill(self.banned_before if len(output_ids) < self.think_at else self.banned, float("-inf"))


def _cmd_demo(args) -> int:
    if args.random:
        if args.image or args.question:
            raise ValueError("--random runs the bundled question only (its answers are gibberish)")
        return _demo_random(args)
    return _demo_trained(args)


def _demo_trained(args) -> int:
    from pacore import PaCoRe, PaCoReConfig, Problem
    from step3vl.tasks.shapes import shapes_reward

    problem = json.loads((ASSETS / "demo_problem.json").read_text())
    if args.image is None and args.question is not None:
        raise ValueError("a question of your own needs --image PATH (the bundled picture has its own question)")
    image = args.image or ASSETS / problem["image"]
    question = args.question or problem["question"]
    llm = _load_llm(args, args.model)
    cfg = PaCoReConfig.preset(args.preset, max_tokens=args.max_tokens or 128,
                              message_max_tokens=args.message_max_tokens, seed=args.seed)
    print(f"model: {args.model}")
    print(f"picture: {image}\nquestion: {question}")
    print(f"PaCoRe preset {args.preset!r}: rounds {cfg.schedule} (trajectories per round; the last synthesises)")
    t0 = time.perf_counter()
    result = PaCoRe(llm, cfg).run([Problem.from_question(question, image=str(image), id="demo")], progress=True)[0]
    wall = time.perf_counter() - t0
    _print_result(result, show_reasoning=True, show_rounds=args.show_reasoning)
    print(f"tokens generated: {result.effective_ttc} in {wall:.1f}s ({llm.model.device})")
    if args.image is None and result.error is None:
        right = shapes_reward(result.final_response, problem["answer"]) == 1.0
        print(f"expected: {problem['answer']}: {'correct' if right else 'WRONG'}")
    return 0 if result.error is None else 1


def _demo_random(args) -> int:
    from pacore import PaCoRe, PaCoReConfig, Problem

    args.max_tokens = args.max_tokens or 64
    path, made = _demo_checkpoint(args.dir)
    print(f"checkpoint: {path} ({'made now' if made else 'reused'}, preset 'small')")
    print("NOTE: the weights are RANDOM. The answer is gibberish by construction; the demo shows the machinery "
          "(rounds, tokens, throughput), not intelligence.")
    problem = json.loads((ASSETS / "demo_problem.json").read_text())
    image = ASSETS / problem["image"]
    llm = _load_llm(args, path)
    think_at = args.think_at if args.think_at is not None else max(1, args.max_tokens * 3 // 4)
    proc = RandomWeightsProcessor(llm.get_tokenizer(), llm.model.cfg.text.vocab_size, think_at)

    def hook(pid, r, params):
        params.logits_processors = [proc]
        return params

    cfg = PaCoReConfig.preset(args.preset, max_tokens=args.max_tokens, message_max_tokens=args.message_max_tokens,
                              seed=args.seed, sampling_hook=hook)
    print(f"problem: {image.name}: {problem['question']}")
    print(f"PaCoRe preset {args.preset!r}: rounds {cfg.schedule}, {args.max_tokens} new tokens per trajectory, "
          f"messages <= {args.message_max_tokens} tokens; random weights never write </think>, so it is forced at "
          f"token {think_at}, and sampling keeps to ids the tokenizer can decode")
    t0 = time.perf_counter()
    result = PaCoRe(llm, cfg).run([Problem.from_question(problem["question"], image=str(image), id="demo")],
                                  progress=True)[0]
    wall = time.perf_counter() - t0
    _print_result(result, show_reasoning=args.show_reasoning, show_rounds=True)
    stats = llm.kv_stats()
    print(f"tokens generated: {result.effective_ttc} in {wall:.1f}s = {result.effective_ttc / wall:.1f} tok/s "
          f"(device {llm.model.device}); prefill tokens computed {stats['prefill_tokens_computed']}, "
          f"peak KV {stats['peak_blocks_used']} blocks ({stats['peak_bytes_in_use'] / 2**20:.1f} MiB)")
    print(f"expected answer for a trained model: {problem['answer']} (this one has random weights)")
    return 0 if result.error is None else 1


# -- pacore -----------------------------------------------------------------------------------------

def _pacore_config(args):
    from pacore import PaCoReConfig

    kwargs = dict(max_tokens=args.max_tokens, message_max_tokens=args.message_max_tokens,
                  temperature=args.temperature, top_p=args.top_p, seed=args.seed, unclosed_policy=args.unclosed,
                  max_concurrent_problems=args.max_concurrent_problems)
    if args.rounds:
        try:
            rounds = [int(x) for x in args.rounds.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--rounds {args.rounds!r}: use comma-separated ints such as 8,4") from None
        return PaCoReConfig(rounds=rounds, **kwargs)
    return PaCoReConfig.preset(args.preset, **kwargs)


def _pacore_dist(args):
    """This process's DistEnv: under torchrun each rank runs its share of the batch on its own engine and device
    (cuda:LOCAL_RANK, or the CPU with gloo); world size 1 otherwise (--device untouched)."""
    from step3vl.distributed import init_distributed

    # The ranks wait at the end for the slowest one, which may be hours behind in a long run, so the collectives'
    # timeout is long unless STEP3VL_DIST_TIMEOUT_S sets one; a rank that dies still fails the run at once (gloo
    # sees the closed connection, and torchrun stops the other ranks).
    env = init_distributed(args.device, timeout_s=None if "STEP3VL_DIST_TIMEOUT_S" in os.environ else 7 * 86400.0)
    if env.is_distributed:
        args.device = str(env.device)
    return env


def _cmd_pacore(args) -> int:
    from pacore import PaCoRe, Problem
    from pacore.batch import run_batch

    batch = args.input is not None or args.output is not None
    if batch and (args.input is None or args.output is None):
        raise ValueError("a batch run needs both --input and --output")
    if batch and (args.question or args.image):
        raise ValueError("give either a question (with --image) or --input/--output, not both")
    if not batch and not args.question:
        raise ValueError("give a question, or --input/--output for a batch")
    if not batch and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("one question runs in one process: start it without torchrun (under torchrun, a batch "
                         "--input/--output is split over the ranks)")
    cfg = _pacore_config(args)
    env = _pacore_dist(args) if batch else None
    llm = _load_llm(args, args.model)
    runner = PaCoRe(llm, cfg)
    if batch:
        from step3vl.distributed import close_distributed
        from step3vl.train.rewards import math_reward

        t0, n, errors, tokens, graded, correct = time.perf_counter(), 0, 0, 0, 0, 0
        try:
            for rec in run_batch(runner, args.input, args.output, progress=not args.no_progress and env.is_main,
                                 retry_errors=args.retry_errors, dist=env):
                n += 1
                tokens += rec.get("effective_ttc", 0)
                if rec.get("error"):
                    errors += 1
                    print(f"[{rec['request_id']}] error: {rec['error']}", file=sys.stderr)
                elif rec.get("ground_truth") is not None:
                    graded += 1
                    correct += math_reward(rec.get("final_response") or "", rec["ground_truth"]) > 0.5
            n, errors, tokens, graded, correct = (sum(c) for c in zip(*env.all_gather_objects(
                (n, errors, tokens, graded, correct))))
        except Exception as e:
            if env.is_distributed:  # torchrun stops the other ranks; say which one stopped and why
                print(f"step3vl pacore: rank {env.rank} of {env.world_size} stopped: {type(e).__name__}: {e}\n"
                      f"step3vl pacore: the records written so far are kept ({args.output} and "
                      f"{args.output}.part-*); the same command resumes the run, with any number of ranks",
                      file=sys.stderr, flush=True)
            raise
        if env.is_distributed:
            close_distributed()
            if not env.is_main:
                return 0
        wall = time.perf_counter() - t0
        print(f"{n} problem(s) written to {args.output} ({errors} with an error); {tokens} tokens in {wall:.1f}s")
        if graded:
            print(f"accuracy (math_reward of the final response against ground_truth): {correct}/{graded} = "
                  f"{correct / graded:.1%}")
        return 0
    content = args.question
    if args.image:
        content = [{"type": "image", "image": im} for im in args.image] + [{"type": "text", "text": args.question}]
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": content}]
    t0 = time.perf_counter()
    result = runner.run([Problem(id="0", messages=messages)], progress=not args.no_progress)[0]
    wall = time.perf_counter() - t0
    _print_result(result, show_reasoning=args.show_reasoning, show_rounds=args.show_rounds)
    print(f"tokens generated: {result.effective_ttc} in {wall:.1f}s = {result.effective_ttc / max(wall, 1e-9):.1f} tok/s")
    return 0 if result.error is None else 1


def _print_result(result, show_reasoning: bool, show_rounds: bool) -> None:
    last = len(result.rounds) - 1
    for r, s in enumerate(result.rounds):
        name = "final" if r == last and result.error is None else f"round {r + 1}"
        dropped = ", ".join(f"{n} {k}" for k, n in s.dropped.items()) or "none"
        print(f"{name}: K={s.k} prompt {s.prompt_tokens} tok (prefix hit {s.prefix_hit_tokens}), generated "
              f"{s.generated_tokens} tok, messages {s.messages}, dropped {dropped}, truncated {s.truncated}, "
              f"{s.seconds:.1f}s")
        if show_rounds and r < len(result.round_responses) and r != last:
            for i, resp in enumerate(result.round_responses[r]):
                if resp["content"]:
                    print(f"  message {i + 1}: {_short(resp['content'])}")
    if show_reasoning and result.final_reasoning_content:
        print("reasoning:\n" + result.final_reasoning_content)
    if result.error:
        print(f"error: {result.error}")
    else:
        print("answer:\n" + result.final_response.strip())


def _short(text: str, n: int = 120) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= n else text[:n] + "…"


# -- generate / make-checkpoint ---------------------------------------------------------------------

def _cmd_generate(args) -> int:
    from step3vl.engine.sampling_params import SamplingParams

    llm = _load_llm(args, args.model)
    params = SamplingParams(n=args.n, max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
    if args.raw:
        if args.image:
            raise ValueError("--raw takes no --image (the image placeholder comes from the chat template)")
        out = llm.generate(args.prompt, params, use_tqdm=False)[0]
    else:
        content = args.prompt
        if args.image:
            content = [{"type": "image", "image": im} for im in args.image] + [{"type": "text", "text": args.prompt}]
        out = llm.chat([{"role": "user", "content": content}], params, use_tqdm=False)[0]
    for c in out.outputs:
        head = f"[{c.index}] " if args.n > 1 else ""
        print(f"{head}{c.text}")
        print(f"{head}({len(c.token_ids)} tokens, finish_reason={c.finish_reason})", file=sys.stderr)
    return 0


def _cmd_serve(args) -> int:
    import uvicorn

    from pacore import PaCoReConfig
    from pacore.serve import PaCoReService
    from step3vl.engine.async_llm import AsyncLLM
    from step3vl.serve import MediaPolicy, OpenAIServer, ServerConfig

    if args.random and not args.demo:
        raise ValueError("--random goes with --demo")
    if args.demo and args.random:
        args.model, _ = _demo_checkpoint(DEMO_DIR)
        args.think_at = 48 if args.think_at is None else args.think_at
    elif args.demo:
        args.model = SHAPES_MODEL
    if args.model is None:
        raise ValueError("give --model DIR (a checkpoint directory) or --demo")
    template = _read_template(args.chat_template) if args.chat_template is not None else None  # before loading
    llm = _load_llm(args, args.model)
    if template is not None:
        llm.get_tokenizer().chat_template = template
    config = ServerConfig(served_model_name=args.served_model_name or Path(args.model).resolve().name,
                          reasoning_parser=not args.no_reasoning_parser,
                          api_key=args.api_key or os.environ.get("STEP3VL_API_KEY"),
                          media=MediaPolicy(allowed_local_media_path=args.allowed_local_media_path,
                                            fetch_urls=not args.no_fetch_urls,
                                            allow_private_urls=args.allow_private_urls),
                          max_n=args.max_n, tool_call_parser=args.tool_call_parser == "hermes",
                          enable_sleep_mode=args.enable_sleep_mode)
    if args.think_at is not None:
        config.logits_processors = [RandomWeightsProcessor(llm.get_tokenizer(), llm.model.cfg.text.vocab_size,
                                                           args.think_at)]
    engine = AsyncLLM(llm)
    server = OpenAIServer(engine, config)
    presets = [p for p in args.pacore_presets.split(",") if p]
    if presets:
        base = PaCoReConfig(max_tokens=args.pacore_max_tokens or llm.max_model_len,
                            message_max_tokens=args.message_max_tokens)
        PaCoReService(server, base, presets, max_trajectories=args.max_pacore_trajectories)
    print(f"step3vl serve: {config.served_model_name} on http://{args.host}:{args.port}/v1 "
          f"(max_model_len {llm.max_model_len}; models: {', '.join(m.id for m in _model_ids(server))})",
          file=sys.stderr)
    try:
        uvicorn.run(server.app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        engine.shutdown()
    return 0


def _cmd_recipe(args) -> int:
    from pacore.recipes.shapes import STAGES, ShapesRecipe, export_model, run_recipe

    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip()) if args.stages is not None else STAGES
    make = ShapesRecipe.toy if args.toy else ShapesRecipe
    sizes = {} if args.pretrain_examples is None else {"pretrain_examples": args.pretrain_examples}
    recipe = make(out=args.out, seed=args.seed, device=args.device, **sizes)
    run_recipe(recipe, stages)
    print(f"recipe shapes: stages {', '.join(stages) or 'none'} done in {args.out}")
    if args.export is not None:
        print(f"exported the model with its card to {export_model(recipe, args.export, args.export_checkpoint)}")
    return 0


def _cmd_eval(args) -> int:
    from pacore.recipes.evaluate import evaluate_shapes, plot_evaluation, table

    if not 1 <= args.problems <= 500:
        raise ValueError(f"--problems {args.problems}: the held-out set is seeds 0-499 (1..500 problems)")
    llm = _load_llm(args, args.model)
    report = evaluate_shapes(args.model, list(range(args.problems)), samples=args.samples,
                             max_tokens=args.max_tokens, seed=args.seed, llm=llm, progress=True)
    print(table({args.model.name: report}))
    d = report["pacore_medium_minus_sc"]
    print(f"PaCoRe medium - SC@{args.samples}: {100 * d['mean']:+.1f} points "
          f"[{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}] (paired, 95%)")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
        plot_evaluation({args.model.name: report}, args.out.with_suffix(".png"))
        print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


def _read_template(path: Path) -> str:
    import jinja2

    text = path.read_text(encoding="utf-8")  # a missing file: FileNotFoundError, reported by main()
    try:
        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"{path}:{e.lineno}: not a valid Jinja template: {e.message}") from None
    return text


def _model_ids(server):
    import asyncio

    return asyncio.run(server.models()).data


def _on_ranks(command: str, out: Path, run) -> int:
    """run() in this process; under torchrun, a failure says which rank stopped and how to resume (torchrun then
    stops the other ranks), and the process group is closed at the end."""
    from step3vl.distributed import close_distributed

    try:
        return run()
    except Exception as e:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:
            print(f"step3vl {command}: rank {os.environ.get('RANK', '?')} of {world} stopped: {type(e).__name__}: {e}\n"
                  f"step3vl {command}: the newest complete {out.name}-step<k> checkpoint resumes the run (--resume), "
                  f"with any number of ranks", file=sys.stderr, flush=True)
        raise
    finally:
        close_distributed()


def _cmd_train(args) -> int:
    return _on_ranks("train", args.out, lambda: _train(args))


def _train(args) -> int:
    from step3vl.distributed import init_distributed
    from step3vl.train.pretrain import PretrainConfig
    from step3vl.train.run import pretrain

    env = init_distributed(args.device)
    cfg = PretrainConfig(optim=_optim_config(args), max_tokens_per_batch=args.max_tokens_per_batch,
                         grad_accum=args.grad_accum, epochs=args.epochs, max_steps=args.max_steps,
                         train_vision=not args.freeze_vision, seed=args.seed,
                         activation_checkpointing=args.activation_checkpointing, max_seq_len=args.max_seq_len,
                         eval_every=args.eval_every)
    logs = pretrain(args.model, args.data, args.out, cfg, log_path=args.log, save_every=args.save_every,
                    save_dtype=_torch_dtype(args.save_dtype), resume=args.resume, eval_data=args.eval_data, env=env)
    if logs and env.is_main:
        held_out = f", eval loss {logs[-1].eval_loss:.4f}" if logs[-1].eval_loss is not None else ""
        ranks = f" on {env.world_size} ranks" if env.is_distributed else ""
        print(f"{len(logs)} steps{ranks}, loss {logs[0].loss:.4f} -> {logs[-1].loss:.4f}{held_out}; wrote {args.out}")
    return 0


def _cmd_rl(args) -> int:
    return _on_ranks("rl", args.out, lambda: _rl(args))


def _rl(args) -> int:
    from step3vl.distributed import init_distributed
    from step3vl.train.rl import RLConfig
    from step3vl.train.run import PromptBatches, read_rl_prompts, reinforce

    env = init_distributed(args.device)
    prompts = read_rl_prompts(args.problems)
    batches = (_synthesis_batches(args, prompts) if args.pacore_results is not None
               else PromptBatches(prompts, args.batch_size, args.seed))
    cfg = RLConfig(optim=_optim_config(args), total_steps=args.steps, group_size=args.group_size,
                   temperature=args.temperature, max_tokens=args.max_tokens, advantage=args.advantage,
                   clip_eps=args.clip_eps, ppo_epochs=args.ppo_epochs, truncated_reward=args.truncated_reward,
                   max_tokens_per_batch=args.max_tokens_per_batch, engine_is_cap=args.engine_is_cap,
                   kl_coef=args.kl_coef, engine_sleep_level=args.engine_sleep_level, seed=args.seed)
    engine = {"kv_cache_memory": args.kv_cache_memory} if args.kv_cache_memory else {}
    logs = reinforce(args.model, batches, args.out, args.steps, cfg, engine_kwargs=engine,
                     log_path=args.log, save_every=args.save_every, save_dtype=_torch_dtype(args.save_dtype), resume=args.resume,
                     eval_prompts=read_rl_prompts(args.eval_problems) if args.eval_problems else None,
                     eval_every=args.eval_every, eval_samples=args.eval_samples, env=env)
    if logs and env.is_main:
        held_out = f", eval reward {logs[-1].eval_reward:.3f}" if logs[-1].eval_reward is not None else ""
        ranks = f" on {env.world_size} ranks" if env.is_distributed else ""
        print(f"{len(logs)} steps{ranks}, mean reward {logs[0].reward_mean:.3f} -> {logs[-1].reward_mean:.3f}"
              f"{held_out}; wrote {args.out}")
    return 0


def _synthesis_batches(args, prompts):
    """PaCoRe synthesis episodes over the messages of the problems' PaCoRe results, drawn afresh each step."""
    from pacore import EpisodeConfig, Problem, pool_from_result
    from pacore.episodes import EpisodeBatches
    from step3vl.train.data import read_jsonl

    pools = {str(rec.get("request_id")): pool_from_result(rec) for _, rec in read_jsonl(args.pacore_results)}
    problems = [Problem(p.id, p.messages, ground_truth=p.answer) for p in prompts]
    batches = EpisodeBatches(problems, pools, EpisodeConfig(min_refs=args.min_refs, max_refs=args.max_refs,
                                                           seed=args.seed), args.batch_size)
    print(f"synthesis episodes for {len(batches.order.prompts)} problems", file=sys.stderr)
    return batches


def _cmd_plan_memory(args) -> int:
    from step3vl.train.memory_plan import main as plan_memory_main

    argv = ["--world-sizes", args.world_sizes, "--tokens", args.tokens, "--images", str(args.images)]
    argv += ["--no-mixed-precision"] * args.no_mixed_precision + ["--json"] * args.json
    return plan_memory_main(argv)


def _cmd_make_checkpoint(args) -> int:
    from step3vl.tools.make_tiny_checkpoint import make_tiny_checkpoint

    path = make_tiny_checkpoint(args.dir, args.preset, args.seed)
    print(f"wrote a {args.preset} checkpoint to {path} (random weights)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

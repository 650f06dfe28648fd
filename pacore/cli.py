"""PaCoRe's part of the `step3vl` command line, added through step3vl's plugin interface (step3vl/plugins.py;
the entry point `pacore` of group `step3vl.plugins` in pyproject.toml names `register`): the commands demo, pacore,
recipe and eval; the PaCoRe chat models and `POST /v1/pacore` of `step3vl serve` (with their options); and
`step3vl rl --pacore-results`, RL on synthesis episodes. step3vl never imports this package.

Every `step3vl` invocation loads this module, so it imports only the light step3vl.cli at its top; the method
itself is imported inside the commands.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from step3vl.cli import (ASSETS, DEMO_DIR, SHAPES_MODEL, RandomWeightsProcessor, add_engine_args, demo_checkpoint,
                         load_llm)

logger = logging.getLogger(__name__)
PRESET_HELP = ("PaCoRe's compute: trajectories per round, the last round (1) synthesising the answer: low = 4,1; "
               "medium = 16,1; high = 32,4,1")


def register(registry) -> None:
    """The plugin's entry point; `registry` is a step3vl.plugins.PluginRegistry."""
    registry.add_command("demo", "PaCoRe with the bundled shapes model on the bundled picture (or your own)",
                         _demo_arguments, _cmd_demo)
    registry.add_command("pacore", "PaCoRe on one question (--image, question) or a JSONL batch (--input/--output)",
                         _pacore_arguments, _cmd_pacore)
    registry.add_command("recipe", "train a model end to end: `recipe shapes` (see pacore/recipes/shapes.py)",
                         _recipe_arguments, _cmd_recipe)
    registry.add_command("eval", "evaluate a checkpoint: `eval shapes` (greedy, single, self-consistency, PaCoRe)",
                         _eval_arguments, _cmd_eval)
    registry.add_server_extension(_serve_pacore, _serve_arguments)
    registry.add_rl_batches(_synthesis_batches, _rl_arguments)


# -- arguments ------------------------------------------------------------------------------------------------

def _demo_arguments(d: argparse.ArgumentParser) -> None:
    """`step3vl demo`."""
    d.add_argument("question", nargs="?", default=None,
                   help="a question about --image (default: the bundled picture's question)")
    d.add_argument("--image", type=Path, default=None, help="your own shapes picture (default: the bundled one)")
    d.add_argument("--model", type=Path, default=SHAPES_MODEL,
                   help="checkpoint (default: the bundled model trained by `step3vl recipe shapes`)")
    d.add_argument("--random", action="store_true",
                   help="instead: a small random-weight checkpoint (benchmarking the machinery; gibberish text)")
    d.add_argument("--dir", type=Path, default=DEMO_DIR, help="--random: checkpoint to make or reuse")
    d.add_argument("--preset", default="medium", choices=["low", "medium", "high"], help=PRESET_HELP)
    d.add_argument("--max-tokens", type=int, default=None,
                   help="new tokens per trajectory (default 128; 64 with --random)")
    d.add_argument("--message-max-tokens", type=int, default=24,
                   help="bound on each message passed on to the next round (tokens)")
    d.add_argument("--think-at", type=int, default=None,
                   help="--random: position where </think> is forced (random weights never write it); default 3/4 "
                        "of --max-tokens")
    d.add_argument("--seed", type=int, default=42, help="PaCoRe's seed (every trajectory's sampling seed derives "
                                                        "from it)")
    d.add_argument("--show-reasoning", action="store_true",
                   help="more output: with the trained model, every round's messages (its final reasoning is always "
                        "shown); with --random, the final trajectory's reasoning")
    add_engine_args(d)


def _pacore_arguments(p: argparse.ArgumentParser) -> None:
    """`step3vl pacore`."""
    p.add_argument("question", nargs="?", help="the question (one-problem mode)")
    p.add_argument("--model", required=True, type=Path, help="checkpoint directory")
    p.add_argument("--image", action="append", default=[], help="an image for the question (repeatable)")
    p.add_argument("--system", default=None, help="a system message")
    p.add_argument("--input", type=Path, help="JSONL problems in the official format (id, messages, ...)")
    p.add_argument("--output", type=Path, help="JSONL results; an existing file is resumed")
    p.add_argument("--retry-errors", action="store_true", help="on resume, run again the problems that failed")
    p.add_argument("--preset", default="medium", choices=["low", "medium", "high"], help=PRESET_HELP)
    p.add_argument("--rounds", default=None, help="override the preset, e.g. 8,4 (a final round of 1 is added)")
    p.add_argument("--max-tokens", type=int, default=131072, help="new tokens per trajectory")
    p.add_argument("--message-max-tokens", type=int, default=4096, help="bound on each message passed on")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of every trajectory")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling of every trajectory: the most likely tokens up to this probability mass")
    p.add_argument("--seed", type=int, default=42,
                   help="PaCoRe's seed (every trajectory's sampling seed derives from it and the problem)")
    p.add_argument("--unclosed", default="drop", choices=["drop", "keep"],
                   help="a trajectory without </think>: drop it (default) or pass its whole text on")
    p.add_argument("--max-concurrent-problems", type=int, default=None,
                   help="problems of a batch in flight at once (default: all of them)")
    p.add_argument("--show-reasoning", action="store_true", help="print the final trajectory's reasoning")
    p.add_argument("--show-rounds", action="store_true", help="print every round's messages")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_engine_args(p)


def _recipe_arguments(rc: argparse.ArgumentParser) -> None:
    """`step3vl recipe`."""
    rc.add_argument("task", choices=["shapes"], help="the recipe: shapes (pacore/recipes/shapes.py)")
    rc.add_argument("--out", type=Path, required=True, help="the run's directory (an existing one is resumed)")
    rc.add_argument("--seed", type=int, default=0,
                    help="seed of every stage: the initial weights, the data order and the sampling (the problems are "
                         "fixed)")
    rc.add_argument("--stages", default=None, help="comma-separated subset of init,vision,pretrain,rl,pools,synthesis_sft,synthesis,eval")
    rc.add_argument("--pretrain-examples", type=int, default=None,
                    help="pre-training problems (default: the recipe's 60,000; a resumed run needs the same value)")
    rc.add_argument("--toy", action="store_true", help="every stage at toy size (a smoke test, well under a minute)")
    rc.add_argument("--export", type=Path, default=None,
                    help="after the stages, copy the final checkpoint here with its model card and plots "
                         "(step3vl/assets/shapes_demo ships it as the demo's model)")
    rc.add_argument("--export-checkpoint", default="synthesis", choices=["rl", "synthesis"],
                    help="which stage's checkpoint --export copies")
    rc.add_argument("--device", default=None, help="cuda or cpu for every stage (default: CUDA when available)")
    rc.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def _eval_arguments(ev: argparse.ArgumentParser) -> None:
    """`step3vl eval`."""
    ev.add_argument("task", choices=["shapes"], help="the task whose held-out problems are used: shapes")
    ev.add_argument("--model", type=Path, default=SHAPES_MODEL, help="checkpoint (default: the bundled model)")
    ev.add_argument("--problems", type=int, default=500, help="held-out problems (seeds 0..N-1, N <= 500)")
    ev.add_argument("--samples", type=int, default=16, help="samples per problem (single and self-consistency)")
    ev.add_argument("--max-tokens", type=int, default=128, help="new tokens per trajectory")
    ev.add_argument("--seed", type=int, default=0,
                    help="sampling seed (each problem's samples and PaCoRe runs derive theirs from it)")
    ev.add_argument("--out", type=Path, default=None, help="write the JSON report here (and a PNG plot beside it)")
    add_engine_args(ev)


def _serve_arguments(s: argparse.ArgumentParser) -> None:
    """`step3vl serve`: the PaCoRe chat models <name>-pacore-<preset> beside the base."""
    s.add_argument("--pacore-presets", default="low,medium,high",
                   help="PaCoRe chat models <name>-pacore-<preset> to serve ('' for none)")
    s.add_argument("--pacore-max-tokens", type=int, default=None,
                   help="per-trajectory new tokens when a request names none (default: the context's room)")
    s.add_argument("--message-max-tokens", type=int, default=4096, help="bound on each message passed between rounds")
    s.add_argument("--max-pacore-trajectories", type=int, default=64,
                   help="the most trajectories, all rounds together, one PaCoRe problem may ask for")
    s.add_argument("--max-pacore-problems", type=int, default=64,
                   help="the most problems one POST /v1/pacore request may carry")


def _rl_arguments(r: argparse.ArgumentParser) -> None:
    """`step3vl rl`: synthesis episodes over PaCoRe results instead of the plain problems."""
    r.add_argument("--pacore-results", type=Path, default=None,
                   help="PaCoRe results JSONL (from `step3vl pacore --output`): train on synthesis episodes whose "
                        "references are drawn from these messages")
    r.add_argument("--min-refs", type=int, default=16,
                   help="with --pacore-results: the fewest reference messages in a synthesis episode")
    r.add_argument("--max-refs", type=int, default=24,
                   help="with --pacore-results: the most reference messages (each episode draws its count uniformly "
                        "between --min-refs and this)")


# -- commands -------------------------------------------------------------------------------------------------

def _cmd_demo(args) -> int:
    if args.random:
        if args.image or args.question:
            raise ValueError("--random runs the bundled question only (its answers are gibberish)")
        return _demo_random(args)
    return _demo_trained(args)


def _demo_trained(args) -> int:
    from step3vl_pacore import PaCoRe, PaCoReConfig, Problem
    from step3vl.tasks.shapes import shapes_reward

    problem = json.loads((ASSETS / "demo_problem.json").read_text())
    if args.image is None and args.question is not None:
        raise ValueError("a question of your own needs --image PATH (the bundled picture has its own question)")
    image = args.image or ASSETS / problem["image"]
    question = args.question or problem["question"]
    llm = load_llm(args, args.model)
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
    from step3vl_pacore import PaCoRe, PaCoReConfig, Problem

    args.max_tokens = args.max_tokens or 64
    path, made = demo_checkpoint(args.dir)
    print(f"checkpoint: {path} ({'made now' if made else 'reused'}, preset 'small')")
    print("NOTE: the weights are RANDOM. The answer is gibberish by construction; the demo shows the machinery "
          "(rounds, tokens, throughput), not intelligence.")
    problem = json.loads((ASSETS / "demo_problem.json").read_text())
    image = ASSETS / problem["image"]
    llm = load_llm(args, path)
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
    from step3vl_pacore import PaCoReConfig

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
    from step3vl_pacore import PaCoRe, Problem
    from step3vl_pacore.batch import run_batch

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
    llm = load_llm(args, args.model)
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


def _cmd_recipe(args) -> int:
    from step3vl_pacore.recipes.shapes import STAGES, ShapesRecipe, export_model, run_recipe

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
    from step3vl_pacore.recipes.evaluate import evaluate_shapes, plot_evaluation, table

    if not 1 <= args.problems <= 500:
        raise ValueError(f"--problems {args.problems}: the held-out set is seeds 0-499 (1..500 problems)")
    llm = load_llm(args, args.model)
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


# -- serve / rl -----------------------------------------------------------------------------------------------

def _serve_pacore(server, args) -> None:
    """The server extension: one chat model per preset and `POST /v1/pacore` (none with --pacore-presets '')."""
    from step3vl_pacore import PaCoReConfig
    from step3vl_pacore.serve import PaCoReService

    presets = [p for p in args.pacore_presets.split(",") if p]
    if presets:
        base = PaCoReConfig(max_tokens=args.pacore_max_tokens or server.max_model_len,
                            message_max_tokens=args.message_max_tokens)
        PaCoReService(server, base, presets, max_trajectories=args.max_pacore_trajectories,
                      max_problems=args.max_pacore_problems)


def _synthesis_batches(args, prompts):
    """The RL batch source: PaCoRe synthesis episodes over the messages of the problems' PaCoRe results, drawn
    afresh each step; None without --pacore-results (`step3vl rl` draws the plain problems then)."""
    if args.pacore_results is None:
        return None
    from step3vl_pacore import EpisodeConfig, Problem, pool_from_result
    from step3vl_pacore.episodes import EpisodeBatches
    from step3vl.train.data import read_jsonl

    pools = {str(rec.get("request_id")): pool_from_result(rec) for _, rec in read_jsonl(args.pacore_results)}
    problems = [Problem(p.id, p.messages, ground_truth=p.answer) for p in prompts]
    batches = EpisodeBatches(problems, pools, EpisodeConfig(min_refs=args.min_refs, max_refs=args.max_refs,
                                                           seed=args.seed), args.batch_size)
    logger.info("synthesis episodes for %d problems", len(batches.order.prompts))
    return batches

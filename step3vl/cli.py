"""`step3vl` command line: generate, serve, train, rl, make-checkpoint, plan-memory, and the commands of the
installed plugins (step3vl/plugins.py: PaCoRe's demo, pacore, recipe and eval come from the `pacore` plugin).

This module never imports a plugin: it asks the plugin registry for the commands to add, the options and the
server extensions of `step3vl serve`, and the RL batch sources of `step3vl rl`. The helpers plugin commands
share (add_engine_args, load_llm, demo_checkpoint, RandomWeightsProcessor) are public here.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from step3vl.logs import LEVELS, LOGGING_LEVEL_ENV, configure_logging, level_name
from step3vl.plugins import PLUGINS_ENV, PluginRegistry, PluginWarning, load_plugins, plugin_offering

logger = logging.getLogger("step3vl.cli")  # not __name__: `python -m step3vl.cli` runs it as __main__

DEMO_DIR = Path.home() / ".cache" / "step3vl" / "demo-small"
ASSETS = Path(__file__).resolve().parent / "assets"
# The demo's default model: trained by `step3vl recipe shapes` (its model card is the README.md beside it).
SHAPES_MODEL = ASSETS / "shapes_demo"
# step3vl's own commands, in the order `step3vl --help` lists them (the plugins' follow, in load order).
BUILTIN_COMMANDS = ("generate", "serve", "train", "rl", "make-checkpoint", "plan-memory")


def main(argv: list[str] | None = None, plugins: PluginRegistry | None = None) -> int:
    """`plugins`: the registry whose commands and hooks the CLI offers; default: the installed plugins that
    STEP3VL_PLUGINS allows (load_plugins()). An embedding application passes its own (PluginRegistry.register)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:  # before the plugins load, so that their loading logs at the level asked for
        configure_logging(_log_level_in(argv))
    except ValueError as e:
        print(f"step3vl: error: {e}", file=sys.stderr)
        return 2
    plugins = load_plugins() if plugins is None else plugins
    ap = _parser(plugins)
    word = _command_word(argv)
    if word is not None and word not in BUILTIN_COMMANDS and word not in plugins.commands:
        owner = plugin_offering(word, plugins)
        if owner is not None:
            why = (f"{PLUGINS_ENV}={os.environ.get(PLUGINS_ENV, '')!r} leaves it out: unset {PLUGINS_ENV} or add "
                   f"{owner} to it" if owner in plugins.disabled else "this registry does not load it")
            print(f"step3vl {word}: error: this command comes from the {owner!r} plugin, which is not loaded ({why})",
                  file=sys.stderr)
            return 2
    args = ap.parse_args(argv)
    args.log_level = configure_logging(args.log_level)  # the level in effect, for the commands (uvicorn's)
    if args.command is None:
        ap.print_help()
        return 2
    logger.debug("%s", plugins.summary())
    if getattr(args, "threads", None):
        import torch
        torch.set_num_threads(args.threads)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"step3vl {args.command}: error: {e}", file=sys.stderr)
        return 2


def _command_word(argv: list[str]) -> str | None:
    """The command in `argv`: its first word that is no option (of the top level's options, only --log-level
    takes a value)."""
    words = iter(argv)
    for arg in words:
        if arg == "--log-level":
            next(words, None)
        elif not arg.startswith("-"):
            return arg
    return None


def _log_level_in(argv: list[str]) -> str | None:
    """The value of --log-level in `argv` (before the command or after it), before argparse runs; an unknown
    value is left to argparse's error."""
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        value = argv[i + 1] if arg == "--log-level" and i + 1 < len(argv) else (
            arg.partition("=")[2] if arg.startswith("--log-level=") else None)
        if value is not None:
            return value if value.lower() in LEVELS else None
    return None


class HelpFormatter(argparse.HelpFormatter):
    """`--help` with every option's default: " (default: X)" is added to a help text unless it already says what
    its default is (or what leaving the option out means), or the default is unset (None), off (False) or empty."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default is argparse.SUPPRESS
        if unset or action.default in ([], "") or "default" in text.lower():
            return text
        if not action.option_strings and action.nargs not in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return text  # a required positional
        return f"{text} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """step3vl's parsers (the subcommands' and the plugins' included): HelpFormatter unless told otherwise."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)


def add_log_level_arg(p: argparse.ArgumentParser, top: bool = False) -> None:
    """--log-level: at the top level (`step3vl --log-level debug CMD`) and on every command (`step3vl CMD
    --log-level debug`), one destination: the command's copy leaves the top level's value alone when not given."""
    p.add_argument("--log-level", type=str.lower, choices=LEVELS, default=None if top else argparse.SUPPRESS,
                   help=f"log level of step3vl and its plugins (lines on stderr) and, under `serve`, of uvicorn "
                        f"(default: ${LOGGING_LEVEL_ENV}, else info)")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("step3vl")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _parser(plugins: PluginRegistry) -> argparse.ArgumentParser:
    ap = ArgumentParser(prog="step3vl", description="STEP3-VL-10B engine; plugins add more commands.",
                        epilog=plugins.summary())
    ap.add_argument("--version", action="version", version=f"step3vl {_version()}")
    add_log_level_arg(ap, top=True)
    sub = ap.add_subparsers(dest="command", help="the command (`step3vl COMMAND --help` lists its options)")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help)

    g = command("generate", "plain sampling from a checkpoint")
    g.add_argument("prompt", help="the user message (with --raw: the whole prompt text)")
    g.add_argument("--model", required=True, type=Path, help="checkpoint directory")
    g.add_argument("--image", action="append", default=[],
                   help="an image for the message: a path, file:// or data: URL (repeatable; put before the text)")
    g.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    g.add_argument("--n", type=int, default=1, help="samples to draw (printed as [i] text)")
    g.add_argument("--max-tokens", type=int, default=256, help="new tokens per sample, at most")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0: greedy)")
    g.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling: keep the most likely tokens up to this probability mass (1: all)")
    g.add_argument("--seed", type=int, default=None,
                   help="sampling seed, and the engine's (default: a fresh random seed each run)")
    add_engine_args(g)
    g.set_defaults(func=_cmd_generate)

    s = command("serve", "OpenAI-compatible HTTP server (chat/completions; the plugins' models and routes beside "
                         "the base)")
    s.add_argument("model_path", nargs="?", type=Path, default=None, metavar="MODEL",
                   help="checkpoint directory, as in `vllm serve MODEL` (or --model, or --demo)")
    s.add_argument("--model", type=Path, default=None, help="checkpoint directory (or MODEL, or --demo)")
    s.add_argument("--random", action="store_true",
                   help="with --demo: the random-weight demo checkpoint instead of the bundled shapes model")
    s.add_argument("--demo", action="store_true",
                   help=f"serve the demo's random-weight checkpoint ({DEMO_DIR}, made if missing) with </think> "
                        f"forced at output position 48, to try the API without real weights")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    s.add_argument("--port", type=int, default=8000, help="port to listen on")
    s.add_argument("--served-model-name", default=None, help="model id clients send (default: the directory name)")
    s.add_argument("--chat-template", type=Path, default=None,
                   help="a Jinja chat template file to use instead of the checkpoint's (vLLM's flag)")
    s.add_argument("--no-reasoning-parser", action="store_true",
                   help="return the raw text as content (no reasoning_content split at </think>)")
    s.add_argument("--reasoning-parser", choices=REASONING_PARSERS, default="step3",
                   help="vLLM's flag: the parsers vLLM has for </think> models (step3, qwen3, deepseek_r1) all "
                        "split reasoning_content at </think>, as this server does; none returns the raw text")
    s.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="vLLM's flag, accepted: tool_choice 'auto' is always served here (with "
                        "--tool-call-parser hermes)")
    s.add_argument("--limit-mm-per-prompt", type=json.loads, default=None,
                   help='vLLM\'s flag: the most images one request may carry, e.g. \'{"image": 4}\' '
                        "(default: no limit)")
    s.add_argument("--uvicorn-log-level", default=None, choices=["trace", "debug", "info", "warning", "error",
                                                                   "critical"],
                   help="uvicorn's own log level (default: the --log-level of everything else)")
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
    from step3vl.serve.http_protocol import HEADER_TIMEOUT_S, KEEP_ALIVE_S

    s.add_argument("--header-timeout", type=float, default=HEADER_TIMEOUT_S, metavar="SECONDS",
                   help="a connection that has not sent a complete request head this long after connecting (or "
                        "after the first byte of a later request) gets a 408 and is closed")
    s.add_argument("--timeout-keep-alive", type=float, default=KEEP_ALIVE_S, metavar="SECONDS",
                   help="how long an idle keep-alive connection stays open between requests (vLLM's flag)")
    s.add_argument("--enable-sleep-mode", action="store_true",
                   help="serve POST /sleep?level=1|2, POST /wake_up, GET /is_sleeping (a colocated trainer frees "
                        "the KV pool, and at level 2 the weights, between rollouts)")
    s.add_argument("--api-key", default=None,
                   help="require `Authorization: Bearer KEY` on /v1/* and /tokenize (default: $STEP3VL_API_KEY)")
    s.add_argument("--think-at", type=int, default=None,
                   help="random-weight checkpoints only (demos, benchmarks): every request writes </think> at this "
                        "output position and only decodable text")
    plugins.add_options("serve", s)
    add_engine_args(s, skip=())
    s.set_defaults(func=lambda args: _cmd_serve(args, plugins))

    t = command("train", "next-token training (image-text / chat JSONL) of a checkpoint")
    t.add_argument("--model", required=True, type=Path, help="the checkpoint to start from")
    t.add_argument("--data", required=True, type=Path,
                   help='JSONL: {"messages": [...]} (loss on assistant turns) or {"text": ..., "images": [...]}')
    t.add_argument("--out", required=True, type=Path, help="where to write the trained checkpoint")
    t.add_argument("--epochs", type=int, default=1, help="passes over --data")
    t.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many optimizer steps (default: when the --epochs are done)")
    t.add_argument("--max-tokens-per-batch", type=int, default=8192,
                   help="tokens of one packed micro-batch (examples are packed up to it)")
    t.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    t.add_argument("--freeze-vision", action="store_true", help="train the decoder only")
    t.add_argument("--max-seq-len", type=int, default=None,
                   help="split longer text examples into windows of this many tokens (long documents)")
    t.add_argument("--eval-data", type=Path, default=None, help="held-out JSONL examples (eval_loss in the log)")
    t.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default: at the end)")
    t.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each decoder layer in the backward pass (less memory, more compute)")
    _optim_args(t, lr=1e-5, seed_help="seed of the data order (each epoch's shuffle)")
    t.set_defaults(func=_cmd_train)

    r = command("rl", "RL with outcome rewards (math answers) on problems, or on the batches a plugin's options "
                      "choose")
    r.add_argument("--model", required=True, type=Path,
                   help="the checkpoint to start from (the policy, and the rollout engine's weights)")
    r.add_argument("--problems", required=True, type=Path, help='JSONL problems: {"id", "messages", "ground_truth"}')
    r.add_argument("--out", required=True, type=Path, help="where to write the trained checkpoint")
    r.add_argument("--steps", type=int, default=10, help="optimizer steps (also the length of the lr schedule)")
    r.add_argument("--batch-size", type=int, default=4, help="prompts per step")
    r.add_argument("--group-size", type=int, default=8, help="responses per prompt")
    r.add_argument("--max-tokens", type=int, default=1024, help="new tokens per response")
    r.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature of the rollouts (--engine-is-cap needs 1)")
    r.add_argument("--ppo-epochs", type=int, default=1,
                   help="update passes over each step's responses (1: strictly on-policy)")
    r.add_argument("--clip-eps", type=float, default=0.2,
                   help="PPO clip range: the probability ratio is clipped to [1 - eps, 1 + eps]")
    r.add_argument("--advantage", default="grpo", choices=["grpo", "mean"],
                   help="grpo: (reward - group mean) / (group std + eps); mean: reward - group mean")
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
    _optim_args(r, lr=1e-6, seed_help="seed of the problem order and of the rollouts' sampling")
    r.add_argument("--kv-cache-memory", default=None, help="the rollout engine's KV pool, e.g. 2GiB")
    plugins.add_options("rl", r)
    r.set_defaults(func=lambda args: _cmd_rl(args, plugins))

    m = command("make-checkpoint", "write a random-weight checkpoint in the official format")
    m.add_argument("dir", type=Path, help="directory to write it to (config, safetensors shards, tokenizer)")
    m.add_argument("--preset", default="tiny", choices=["tiny", "small", "small-vl", "shapes", "shapes-tiny"],
                   help="size: tiny (tests, 2 layers of width 64), small (6 layers of 768), small-vl (small with a "
                        "ViT as costly per image as STEP3-VL's), shapes (the demo's model), shapes-tiny (its test "
                        "size)")
    m.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    m.set_defaults(func=_cmd_make_checkpoint)

    pm = command("plan-memory", "per-rank memory plan of FSDP training of STEP3-VL-10B (fake process group)")
    pm.add_argument("--world-sizes", default="8,16,64", help="comma-separated data-parallel world sizes")
    pm.add_argument("--tokens", default="4096,8192,16384", help="comma-separated tokens per micro-batch")
    pm.add_argument("--images", type=int, default=1, help="728-px images in each micro-batch")
    pm.add_argument("--no-mixed-precision", action="store_true", help="fp32 working set and activations")
    pm.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    pm.set_defaults(func=_cmd_plan_memory)

    for cmd in plugins.commands.values():
        if cmd.name in BUILTIN_COMMANDS:
            warnings.warn(f"step3vl plugin {cmd.plugin!r}: its command {cmd.name!r} is a built-in one, left out",
                          PluginWarning, stacklevel=2)
            continue
        c = command(cmd.name, cmd.help)
        cmd.add_arguments(c)
        c.set_defaults(func=cmd.run)
    for c in sub.choices.values():
        if "--log-level" not in c._option_string_actions:  # a plugin's command may define its own
            add_log_level_arg(c)
    return ap


def add_engine_args(p: argparse.ArgumentParser, skip: tuple[str, ...] = ("seed",)) -> None:
    """The engine's options, generated from EngineConfig (one flag per field, its help and default), for every
    command that loads a checkpoint into an LLM; `skip`: fields the command declares itself (its own --seed)."""
    from step3vl.engine.config import EngineConfig

    EngineConfig.add_cli_args(p, skip=skip)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")


def _optim_args(p: argparse.ArgumentParser, lr: float, seed_help: str) -> None:
    o = p.add_argument_group("optimizer")
    o.add_argument("--lr", type=float, default=lr,
                   help="peak learning rate of AdamW (linear warm-up to it, then a cosine down to a tenth of it)")
    o.add_argument("--warmup-steps", type=int, default=0, help="optimizer steps of linear warm-up to --lr")
    o.add_argument("--weight-decay", type=float, default=0.0, help="AdamW's decoupled weight decay")
    o.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradients' global norm to this")
    o.add_argument("--seed", type=int, default=0, help=seed_help)
    o.add_argument("--device", default=None,
                   help="cuda or cpu (default: CUDA when available; under torchrun each rank takes "
                        "cuda:LOCAL_RANK)")
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


def load_llm(args, model: Path):
    """An LLM on checkpoint `model` with the engine flags of add_engine_args."""
    from step3vl.engine.config import EngineConfig
    from step3vl.engine.llm import LLM

    if not (Path(model) / "config.json").is_file():
        raise FileNotFoundError(f"no checkpoint at {model} (config.json missing)")
    return LLM(config=EngineConfig.from_cli_args(args, model=str(model)))


# -- random-weight checkpoints (serve --demo --random; the plugins' demos) ------------------------------

def demo_checkpoint(path: Path) -> tuple[Path, bool]:
    """The small random-weight checkpoint at `path`, made there if missing; (path, whether it was made now)."""
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


# -- generate / make-checkpoint ---------------------------------------------------------------------

def _cmd_generate(args) -> int:
    from step3vl.engine.sampling_params import SamplingParams

    llm = load_llm(args, args.model)
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


def _cmd_serve(args, plugins: PluginRegistry) -> int:
    import uvicorn

    from step3vl.engine.async_llm import AsyncLLM
    from step3vl.serve import MediaPolicy, OpenAIServer, ServerConfig
    from step3vl.serve.http_protocol import header_timeout_protocol

    if args.random and not args.demo:
        raise ValueError("--random goes with --demo")
    if args.model_path is not None:
        if args.model is not None and args.model != args.model_path:
            raise ValueError(f"two models: MODEL {args.model_path} and --model {args.model}")
        args.model = args.model_path
    if args.demo and args.random:
        args.model, _ = demo_checkpoint(DEMO_DIR)
        args.think_at = 48 if args.think_at is None else args.think_at
    elif args.demo:
        args.model = SHAPES_MODEL
    if args.model is None:
        raise ValueError("give --model DIR (a checkpoint directory) or --demo")
    template = _read_template(args.chat_template) if args.chat_template is not None else None  # before loading
    llm = load_llm(args, args.model)
    if template is not None:
        llm.get_tokenizer().chat_template = template
    config = ServerConfig(served_model_name=args.served_model_name or Path(args.model).resolve().name,
                          reasoning_parser=not args.no_reasoning_parser and args.reasoning_parser != "none",
                          max_images_per_prompt=_image_limit(args.limit_mm_per_prompt),
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
    plugins.setup_server(server, args)  # the plugins' models and routes (PaCoRe's: <name>-pacore-<preset>)
    logger.info("step3vl serve: %s on http://%s:%d/v1 (max_model_len %d; models: %s)", config.served_model_name,
                args.host, args.port, llm.max_model_len, ", ".join(m.id for m in _model_ids(server)))
    try:
        uvicorn.run(server.app, **uvicorn_options(args.host, args.port, args.uvicorn_log_level or args.log_level),
                    http=header_timeout_protocol(args.header_timeout), timeout_keep_alive=args.timeout_keep_alive)
    finally:
        engine.shutdown()
    return 0


REASONING_PARSERS = ("step3", "qwen3", "deepseek_r1", "none")


def _image_limit(limit: dict | None) -> int | None:
    if limit is None:
        return None
    if not isinstance(limit, dict) or set(limit) - {"image"} or not isinstance(limit.get("image", 0), int) \
            or limit.get("image", 0) < 0:
        raise ValueError(f"--limit-mm-per-prompt {limit!r}: expected {{\"image\": N}} with N >= 0 (this model "
                         f"takes images only)")
    return limit.get("image")


def uvicorn_options(host: str, port: int, log_level: str | None = None) -> dict:
    """uvicorn.run's options for `step3vl serve`: its log level is step3vl's (--log-level, else
    STEP3VL_LOGGING_LEVEL, else info), so one switch sets both."""
    return dict(host=host, port=port, log_level=log_level if log_level == "trace" else level_name(log_level))


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
    from step3vl.distributed import close_distributed, launched_world_size

    try:
        return run()
    except Exception as e:
        world = launched_world_size()
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


def _cmd_rl(args, plugins: PluginRegistry) -> int:
    return _on_ranks("rl", args.out, lambda: _rl(args, plugins))


def _rl(args, plugins: PluginRegistry) -> int:
    from step3vl.distributed import init_distributed
    from step3vl.train.rl import RLConfig
    from step3vl.train.run import PromptBatches, read_rl_prompts, reinforce

    env = init_distributed(args.device)
    prompts = read_rl_prompts(args.problems)
    batches = plugins.rl_batches(args, prompts)  # a plugin's, when its options were given (PaCoRe's episodes)
    if batches is None:
        batches = PromptBatches(prompts, args.batch_size, args.seed)
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

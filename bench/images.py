"""Image work in the engine: the encoder cache and image identity in the prefix cache, on and off, same run.

Checkpoint: the `small-vl` preset (random weights): the small decoder with a vision tower whose per-image cost
against the decoder is about STEP3-VL's (the ViT sees 16 patches per image row), so the share of time that image
encoding takes is realistic even though every size is small.

- pacore: P problems, each about its own 800x600 picture (a global view and 504-px crops), rounds [K] then the
  final round of one. Every round's prompt holds the picture again. Encoder cache on (default) vs off
  (`encoder_cache_memory=0`: the tail rows that share a block with the changed text are encoded again each round).
- chat: one conversation of T turns, each turn adding a new picture. Image rows keyed by their own picture (ours)
  vs one key for the request's whole image set (emulated with `cache_salt` = the digests of all its images: each
  turn that adds a picture starts cold), each with the encoder cache off, so the prefix cache's share shows alone.

    python bench/images.py [--problems 4] [--k 4] [--turns 4] [--max-tokens 32] [--quick]

Reports wall time, images encoded, seconds in the vision encoder and prefill tokens; JSON under bench/out/.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]  # `pacore` is the package, not a bench
from step3vl_pacore import PaCoRe, PaCoReConfig, Problem  # noqa: E402
from step3vl import LLM, SamplingParams  # noqa: E402
from step3vl.cli import RandomWeightsProcessor  # noqa: E402
from step3vl.engine.image_inputs import image_hash  # noqa: E402

sys.path.append(str(_HERE))
from _common import environment, print_table, small_checkpoint, write_json  # noqa: E402


def picture(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (600, 800, 3), dtype=np.uint8))


class EncoderClock:
    """Seconds spent in the model's vision encoder (wraps `encode_images`)."""

    def __init__(self, llm: LLM):
        self.seconds, inner = 0.0, llm.model.encode_images

        def timed(*a, **k):
            t = time.perf_counter()
            out = inner(*a, **k)
            self.seconds += time.perf_counter() - t
            return out

        llm.model.encode_images = timed


def new_llm(args, encoder_cache) -> tuple[LLM, EncoderClock]:
    llm = LLM(args.ckpt, dtype="float32", device=args.device, kv_cache_memory=args.kv_cache_memory,
              encoder_cache_memory=encoder_cache)
    return llm, EncoderClock(llm)


def stats(llm: LLM, clock: EncoderClock, wall: float) -> dict:
    s = llm.kv_stats()
    return {"wall_s": wall, "images_encoded": s["images_encoded"], "encoder_s": clock.seconds,
            "prefill_tokens": s["prefill_tokens_computed"], "prefix_hit_tokens": s["prefix_hit_tokens"]}


def run_pacore(args, encoder_cache) -> dict:
    llm, clock = new_llm(args, encoder_cache)
    think_at = args.max_tokens - args.message_max_tokens - 1
    proc = RandomWeightsProcessor(llm.get_tokenizer(), llm.model.cfg.text.vocab_size, think_at)

    def hook(problem_id, round_index, params):
        params.logits_processors, params.ignore_eos = [proc], True
        return params

    cfg = PaCoReConfig(rounds=[args.k], max_tokens=args.max_tokens, message_max_tokens=args.message_max_tokens,
                       seed=1, sampling_hook=hook)
    problems = [Problem(f"p{i}", [{"role": "user", "content": [{"type": "image", "image": picture(i)},
                                                              {"type": "text", "text": f"What is in picture {i}?"}]}])
                for i in range(args.problems)]
    t = time.perf_counter()
    PaCoRe(llm, cfg).run(problems)
    return stats(llm, clock, time.perf_counter() - t)


def run_chat(args, per_image_keys: bool) -> dict:
    llm, clock = new_llm(args, 0)
    proc = RandomWeightsProcessor(llm.get_tokenizer(), llm.model.cfg.text.vocab_size, 0)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True, logits_processors=[proc])
    messages, t = [], time.perf_counter()
    for turn in range(args.turns):
        messages.append({"role": "user", "content": [{"type": "image", "image": picture(100 + turn)},
                                                     {"type": "text", "text": f"And picture {turn}?"}]})
        text, images = llm.processor.apply_chat_template(messages)
        prompt = {"prompt": text, "images": images}
        if not per_image_keys:  # the request's whole image set as one key
            prepared = llm.prepare(prompt)
            prompt["cache_salt"] = ",".join(str(image_hash(im)) for im in prepared.images)
        (out,) = llm.generate(prompt, params, use_tqdm=False)
        messages.append({"role": "assistant", "content": out.outputs[0].text})
    return stats(llm, clock, time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", type=Path, default=None, help="checkpoint (default: the cached `small-vl` preset)")
    ap.add_argument("--problems", type=int, default=4)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--message-max-tokens", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--kv-cache-memory", default="1GiB")
    ap.add_argument("--quick", action="store_true", help="2 problems, K=2, 2 turns, 16 new tokens")
    args = ap.parse_args()
    if args.quick:
        args.problems, args.k, args.turns, args.max_tokens, args.message_max_tokens = 2, 2, 2, 16, 8
    args.ckpt = args.ckpt or small_checkpoint(preset="small-vl")
    rows = [
        {"case": "pacore", "side": "encoder cache on", **run_pacore(args, "256MiB")},
        {"case": "pacore", "side": "encoder cache off", **run_pacore(args, 0)},
        {"case": "chat", "side": "rows keyed per image", **run_chat(args, True)},
        {"case": "chat", "side": "one key per image set", **run_chat(args, False)},
    ]
    for on, off in (rows[0:2], rows[2:4]):
        off["ratio_wall"] = off["wall_s"] / on["wall_s"]
    print_table(rows, ["case", "side", "wall_s", "images_encoded", "encoder_s", "prefill_tokens",
                       "prefix_hit_tokens", "ratio_wall"])
    path = write_json(f"images-{args.device}", {"env": environment(), "args": {k: str(v) for k, v in vars(args).items()},
                                                "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

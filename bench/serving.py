"""Online serving, side by side: `step3vl serve` against `transformers serve --continuous-batching` (the server a
transformers user would run), on the same weights, the same machine, with the same load generator.

The checkpoint is the `small` preset's decoder as a plain Qwen3 directory (both servers load it). Its random LM head
is reshaped so every sampled token is a self-contained piece of text and never EOS (rows of tokens that decode to
nothing, to a partial character, or to a special token are zeroed, the others scaled up): every request then
streams text from its first token and runs exactly --max-tokens tokens on both sides. (A text delta is counted
whether a server labels it content or reasoning_content.)

Load: --requests streaming chat requests of ~--prompt-tokens tokens, --max-tokens new tokens each, arriving as a
Poisson process at --rate requests/s (0 = all at once), sent by the official `openai` AsyncOpenAI client. Reported:
output tokens/s over the run, TTFT and end-to-end latency percentiles, inter-token latency.

    pip install "transformers[serving]"      # transformers' server extras, for the baseline
    python bench/serving.py [--requests 32] [--rate 0] [--prompt-tokens 256] [--max-tokens 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

# This folder has a pacore.py: take it off the path before importing the `pacore` package (_common needs it).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
import httpx  # noqa: E402
import openai  # noqa: E402
import step3vl_pacore  # noqa: E402,F401
import torch  # noqa: E402

sys.path.append(str(_HERE))
from _common import OUT, environment, make_problems, print_table, small_checkpoint, write_json  # noqa: E402

MODEL = "bench"


def serving_checkpoint(src: Path, dst: Path, scale: float = 8.0) -> Path:
    """The small preset's decoder as a Qwen3 directory whose LM head only ever picks decodable, non-EOS tokens."""
    if (dst / "config.json").is_file():
        return dst
    from safetensors.torch import load_file, save_file
    from tokenizers import Tokenizer
    from transformers import Qwen3Config

    text = json.loads((src / "config.json").read_text())["text_config"]
    state = {}
    for f in sorted(src.glob("*.safetensors")):
        state.update({k: v for k, v in load_file(f).items()
                      if k.startswith(("model.", "lm_head.")) and not k.startswith("model.vision")})
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    good = torch.tensor([i not in special and _whole_text(tok.decode([i], skip_special_tokens=False))
                         for i in range(text["vocab_size"])])
    head = state["lm_head.weight"].float()
    state["lm_head.weight"] = torch.where(good[:, None], head * scale, torch.zeros_like(head)).to(torch.bfloat16)
    dst.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = Qwen3Config(**{k: v for k, v in text.items() if k not in ("model_type", "torch_dtype")})
    cfg.save_pretrained(dst)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)
    return dst


def _whole_text(s: str) -> bool:
    return bool(s.strip()) and "\ufffd" not in s and s.isprintable()


# -- servers ------------------------------------------------------------------------------------------

def server_command(kind: str, ckpt: Path, port: int) -> list[str]:
    if kind == "step3vl":
        return [sys.executable, "-m", "step3vl.cli", "serve", "--model", str(ckpt), "--port", str(port),
                "--served-model-name", MODEL, "--pacore-presets", "", "--no-reasoning-parser",
                "--kv-cache-memory", "2GiB", "--log-level", "warning"]
    return ["transformers", "serve", str(ckpt), "--continuous-batching", "--device", "cpu", "--dtype", "float32",
            "--reasoning", "off", "--port", str(port), "--log-level", "warning"]


class Server:
    def __init__(self, kind: str, ckpt: Path, port: int, threads: int):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
        self.url, self.kind = f"http://127.0.0.1:{port}", kind
        self.log = open(OUT / f"serving-{kind}.log", "w")
        self.proc = subprocess.Popen(server_command(kind, ckpt, port), stdout=self.log, stderr=subprocess.STDOUT,
                                     env=env, cwd=OUT)
        self.model = MODEL if kind == "step3vl" else str(ckpt)

    def wait(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} server exited; see {self.log.name}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.kind} server did not come up in {timeout} s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


# -- load ---------------------------------------------------------------------------------------------

async def one_request(client, model: str, messages: list, max_tokens: int, seed: int, start: float) -> dict:
    await asyncio.sleep(max(0.0, start - time.perf_counter()))
    sent = time.perf_counter()
    first, stamps, seen = None, [], []
    stream = await client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, seed=seed,
                                                  temperature=1.0, stream=True)
    async for chunk in stream:
        seen.append(chunk)
        delta = chunk.choices[0].delta if chunk.choices else None
        if delta is not None and (delta.content or getattr(delta, "reasoning_content", None)):
            now = time.perf_counter()
            first = first or now
            stamps.append(now)
    done = time.perf_counter()
    if first is None:
        raise RuntimeError(f"request {seed}: the stream carried no text: {[c.model_dump() for c in seen][:3]}")
    return {"ttft": first - sent, "e2e": done - sent, "chunks": len(stamps),
            "itl": (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1)}


async def run_load(server: Server, prompts: list, args) -> dict:
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=3600)
    rng = random.Random(args.seed)
    t0, at, starts = time.perf_counter() + 0.2, 0.0, []
    for _ in prompts:
        starts.append(t0 + at)
        at += rng.expovariate(args.rate) if args.rate > 0 else 0.0
    results = await asyncio.gather(*(one_request(client, server.model, p, args.max_tokens, i, s)
                                     for i, (p, s) in enumerate(zip(prompts, starts))))
    wall = time.perf_counter() - t0
    await client.close()
    return summarize(server.kind, results, wall, args)


def summarize(kind: str, results: list[dict], wall: float, args) -> dict:
    def pct(key: str, q: float) -> float:
        vals = sorted(r[key] for r in results)
        return vals[min(len(vals) - 1, int(q * len(vals)))]

    tokens = args.max_tokens * len(results)
    return {"server": kind, "wall_s": wall, "output_tok_per_s": tokens / wall,
            "ttft_p50_s": pct("ttft", 0.5), "ttft_p99_s": pct("ttft", 0.99),
            "e2e_p50_s": pct("e2e", 0.5), "e2e_p99_s": pct("e2e", 0.99),
            "itl_mean_ms": 1e3 * statistics.mean(r["itl"] for r in results),
            "min_chunks": min(r["chunks"] for r in results)}


def check_lengths(server: Server, messages: list, max_tokens: int) -> None:
    """Both sides must really generate max_tokens tokens (no EOS): else tok/s would not compare."""
    r = httpx.post(server.url + "/v1/chat/completions", timeout=600, json={
        "model": server.model, "messages": messages, "max_tokens": max_tokens, "seed": 0})
    used = r.json()["usage"]["completion_tokens"]
    if used != max_tokens:
        raise RuntimeError(f"{server.kind}: a request generated {used} tokens, not {max_tokens}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--rate", type=float, default=0.0, help="Poisson arrivals per second (0: all at once)")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=["step3vl", "transformers"], default=None)
    args = ap.parse_args(argv)
    ckpt = serving_checkpoint(small_checkpoint(), OUT / "serving-qwen3")
    from tokenizers import Tokenizer

    class _Tok:  # make_problems needs encode + chat_template
        def __init__(self, path: Path):
            self.tok = Tokenizer.from_file(str(path / "tokenizer.json"))
            self.chat_template = json.loads((path / "tokenizer_config.json").read_text()).get("chat_template")

        def encode(self, text: str) -> list[int]:
            return self.tok.encode(text, add_special_tokens=False).ids

    problems = make_problems(_Tok(ckpt), args.requests + 1, args.prompt_tokens, args.seed)
    prompts = [p.messages for p in problems]
    rows = []
    for port, kind in ((8701, "step3vl"), (8702, "transformers")):
        if args.only not in (None, kind):
            continue
        server = Server(kind, ckpt, port, args.threads)
        try:
            server.wait()
            check_lengths(server, prompts[-1], args.max_tokens)  # also the warm-up
            rows.append(asyncio.run(run_load(server, prompts[:-1], args)))
        finally:
            server.stop()
    cols = ["server", "wall_s", "output_tok_per_s", "ttft_p50_s", "ttft_p99_s", "e2e_p50_s", "e2e_p99_s",
            "itl_mean_ms", "min_chunks"]
    print_table(rows, cols)
    payload = {"workload": vars(args), "environment": environment(), "rows": rows}
    if len(rows) == 2:
        ours, theirs = rows
        payload["ratios"] = {"throughput": ours["output_tok_per_s"] / theirs["output_tok_per_s"],
                             "ttft_p50": theirs["ttft_p50_s"] / ours["ttft_p50_s"],
                             "e2e_p50": theirs["e2e_p50_s"] / ours["e2e_p50_s"]}
        print("step3vl vs transformers: " + ", ".join(f"{k} {v:.2f}x" for k, v in payload["ratios"].items()))
    print(f"wrote {write_json(f'serving-rate{args.rate:g}', payload)}")


if __name__ == "__main__":
    main()

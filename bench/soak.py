"""A bounded soak on loopback: the server under mixed load for --minutes, hostile inputs included, watching for
what a long run reveals — errors that should not happen, latency that drifts, memory that grows, KV blocks left
behind.

Load (from --clients threads at once, each picking at random): plain and streamed chat, completions with n > 1,
streams the client drops after a few chunks, PaCoRe chat requests, pictures as data: URLs, and hostile requests
that must be refused without harm (a 140-byte 20000x1 PNG, a broken base64 image, float token ids, a prompt over
the character limit, a body over the size limit, n over --max-n). The server is the real `OpenAIServer` with the
PaCoRe plugin's models, on a random-weight checkpoint with a small KV pool (so preemption happens).

Reported: per request kind the count, the statuses seen and p50/p99 latency; resident memory sampled every
second (start, end, max, and the slope of a least-squares line over the second half, MB per minute); the pool's
blocks in use at the end (must be 0). JSON under bench/out/soak.json.

    python bench/soak.py [--minutes 10] [--clients 6]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import random
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

_HERE = Path(__file__).resolve().parent
# this folder's kernels.py and pacore.py would shadow the top-level `kernels` (transformers imports it) and an
# installed `pacore`
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
import httpx  # noqa: E402
from PIL import Image  # noqa: E402

OUT = _HERE / "out"
MODEL = "soak"


def _png(w: int, h: int, colour=(200, 40, 40)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _chat(content, **kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 12, **kw}


def _image_chat(url: str) -> dict:
    return _chat([{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"}])


KINDS = {  # name: (path, body builder, statuses that are correct)
    "chat": ("/v1/chat/completions", lambda r: _chat(f"Tell me about {r.randint(0, 999)}."), {200}),
    "chat_stream": ("/v1/chat/completions", lambda r: _chat("Stream a story.", stream=True), {200}),
    "completions_n4": ("/v1/completions", lambda r: {"model": MODEL, "prompt": "Once upon", "n": 4, "max_tokens": 8,
                                                     "seed": r.randint(0, 99)}, {200}),
    "dropped_stream": ("/v1/chat/completions", lambda r: _chat("A long answer please.", stream=True,
                                                               max_tokens=200), {200}),
    # A random-weight final round sometimes says nothing after </think>: PaCoRe's documented 500 (type
    # PaCoReError, the result record attached) is then the right answer; any other 500 is not.
    "pacore": ("/v1/chat/completions", lambda r: {**_chat("Which is it?"), "model": f"{MODEL}-pacore-low",
                                                  "max_tokens": 16}, {200, "500 PaCoReError"}),
    "image": ("/v1/chat/completions", lambda r: _image_chat(_png(r.randint(20, 300), r.randint(20, 300))), {200}),
    "bomb_image": ("/v1/chat/completions", lambda r: _image_chat(_png(20000, 1)), {400}),
    "bad_base64": ("/v1/chat/completions", lambda r: _image_chat("data:image/png;base64,@@@@"), {400}),
    "float_ids": ("/v1/completions", lambda r: {"model": MODEL, "prompt": [1, 2.5], "max_tokens": 2}, {400}),
    "long_prompt": ("/v1/chat/completions", lambda r: _chat("word " * 20_000), {400}),
    "huge_body": ("/v1/chat/completions", lambda r: _chat("x" * 3_000_000), {413}),
    "n_over_limit": ("/v1/completions", lambda r: {"model": MODEL, "prompt": ["a", "b"], "n": 40, "max_tokens": 2},
                     {400}),
}
WEIGHTS = {"chat": 6, "chat_stream": 4, "completions_n4": 3, "dropped_stream": 2, "pacore": 1, "image": 3,
           "bomb_image": 1, "bad_base64": 1, "float_ids": 1, "long_prompt": 1, "huge_body": 1, "n_over_limit": 1}


UNEXPECTED: dict[str, list[str]] = defaultdict(list)  # per kind, the first bodies of unexpected answers


def _one(client: httpx.Client, url: str, kind: str, rng: random.Random) -> tuple[int, float]:
    path, body, expected = KINDS[kind]
    t0 = time.perf_counter()
    payload = body(rng)
    if payload.get("stream"):
        with client.stream("POST", url + path, json=payload) as r:
            for i, _ in enumerate(r.iter_lines()):
                if kind == "dropped_stream" and i >= 3:
                    break  # the client goes away mid-stream: the server must abort and free the blocks
            return r.status_code, time.perf_counter() - t0
    r = client.post(url + path, json=payload)
    status = r.status_code
    if status == 500 and '"type":"PaCoReError"' in r.text:
        status = "500 PaCoReError"
    if status not in expected and len(UNEXPECTED[kind]) < 3:
        UNEXPECTED[kind].append(f"{r.status_code}: {r.text[:400]}")
    return status, time.perf_counter() - t0


def _serve(tmp: Path):
    import torch

    from step3vl_pacore import PaCoReConfig
    from step3vl_pacore.serve import PaCoReService
    from step3vl.engine import LLM, AsyncLLM
    from step3vl.serve import OpenAIServer, ServerConfig
    from step3vl.tools.make_tiny_checkpoint import make_tiny_checkpoint

    from step3vl.cli import RandomWeightsProcessor

    torch.set_num_threads(1)
    ckpt = make_tiny_checkpoint(tmp / "ckpt", "tiny", seed=0)
    # A small encoder cache, so its bound (not a leak) is reached within the soak.
    # 2048: a 20-300 px picture of extreme aspect becomes up to ~1,000 prompt tokens (its crops), which a 1024
    # context refused (correctly, with vLLM's overflow 400) 2 times in 6,298 in the first 10-minute soak
    llm = LLM(ckpt, kv_cache_memory="4MiB", max_model_len=2048, encoder_cache_memory="16MiB")
    engine = AsyncLLM(llm)
    # Random weights write </think> at position 6 (as `serve --think-at 6`), so PaCoRe's rounds have messages.
    think = RandomWeightsProcessor(llm.get_tokenizer(), llm.model.cfg.text.vocab_size, think_at=6)
    server = OpenAIServer(engine, ServerConfig(served_model_name=MODEL, max_n=64, max_body_bytes=2 << 20,
                                               logits_processors=[think]))
    PaCoReService(server, PaCoReConfig(max_tokens=16, message_max_tokens=8), ["low"])
    return engine, server


def main() -> None:
    from step3vl.serve.background import BackgroundServer

    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=6)
    # Python-heap growth between a third of the run and its end, by allocating line (tracemalloc slows every
    # allocation: latencies of such a run are not comparable; memory that grows outside Python's heap, e.g. the
    # allocator's arenas, does not show)
    ap.add_argument("--tracemalloc", action="store_true")
    args = ap.parse_args()
    if args.tracemalloc:
        import tracemalloc

        tracemalloc.start(8)
    snapshots = []
    with tempfile.TemporaryDirectory() as tmp:
        engine, server = _serve(Path(tmp))
        results: dict[str, list[tuple[int, float]]] = defaultdict(list)
        rss: list[tuple[float, float]] = []
        stop = time.monotonic() + 60 * args.minutes
        with BackgroundServer(server.app) as url:
            def client_loop(seed: int) -> None:
                rng = random.Random(seed)
                names, weights = zip(*WEIGHTS.items())
                with httpx.Client(timeout=120) as client:
                    while time.monotonic() < stop:
                        kind = rng.choices(names, weights)[0]
                        try:
                            results[kind].append(_one(client, url, kind, rng))
                        except httpx.HTTPError as e:
                            results[kind].append((-1, 0.0))
                            print(f"{kind}: {type(e).__name__}: {e}", file=sys.stderr)

            threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(args.clients)]
            t0 = time.monotonic()
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                rss.append((time.monotonic() - t0, _rss_mb()))
                if args.tracemalloc and not snapshots and rss[-1][0] > 20 * args.minutes:
                    snapshots.append(tracemalloc.take_snapshot())
                time.sleep(1.0)
            time.sleep(1.0)  # the last aborted streams are reaped
            stats = httpx.get(url + "/stats").json()
            if snapshots:
                grown = tracemalloc.take_snapshot().compare_to(snapshots[0], "traceback")
                print(f"Python heap: {tracemalloc.get_traced_memory()[0] / 2**20:.1f} MB traced at the end; the "
                      f"largest growths since a third of the run:")
                for stat in grown[:8]:
                    print(f"  {stat.size_diff / 2**20:+.2f} MB in {stat.count_diff:+d} blocks at "
                          + " <- ".join(f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno}" for f in stat.traceback[:4]))
        engine.shutdown()
    report = _report(results, rss, stats)
    OUT.mkdir(exist_ok=True)
    (OUT / "soak.json").write_text(json.dumps(report, indent=2))


def _report(results: dict, rss: list[tuple[float, float]], stats: dict) -> dict:
    print(f"{'kind':<16} {'n':>5} {'statuses':<22} {'p50 s':>7} {'p99 s':>7}  ok")
    rows, unexpected = {}, 0
    for kind, rs in sorted(results.items()):
        statuses = defaultdict(int)
        for s, _ in rs:
            statuses[s] += 1
        lat = sorted(t for s, t in rs if s != -1)  # -1: the request raised
        p = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan"))  # noqa: E731
        bad = sum(n for s, n in statuses.items() if s not in KINDS[kind][2])
        unexpected += bad
        rows[kind] = {"n": len(rs), "statuses": dict(statuses), "p50_s": p(0.5), "p99_s": p(0.99), "unexpected": bad}
        print(f"{kind:<16} {len(rs):>5} {str(dict(statuses)):<22} {p(0.5):>7.3f} {p(0.99):>7.3f}  "
              f"{'yes' if not bad else f'NO ({bad})'}")
    half = rss[len(rss) // 2:]
    slope = 0.0
    if len(half) > 2:
        xs, ys = [t / 60 for t, _ in half], [m for _, m in half]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / max(sum((x - mx) ** 2 for x in xs), 1e-9)
    mem = {"start_mb": rss[0][1], "end_mb": rss[-1][1], "max_mb": max(m for _, m in rss),
           "second_half_slope_mb_per_min": slope}
    total = sum(r["n"] for r in rows.values())
    print(f"{total} requests, {unexpected} with an unexpected status; RSS {mem['start_mb']:.0f} -> "
          f"{mem['end_mb']:.0f} MB (max {mem['max_mb']:.0f}, second half {slope:+.1f} MB/min); "
          f"blocks in use at the end: {stats['blocks_used']}")
    for kind, bodies in UNEXPECTED.items():
        for b in bodies:
            print(f"  unexpected {kind}: {b}")
    return {"kinds": rows, "memory": mem, "blocks_used_at_end": stats["blocks_used"], "requests": total,
            "unexpected": unexpected, "unexpected_bodies": dict(UNEXPECTED), "rss_series": rss}


if __name__ == "__main__":
    main()

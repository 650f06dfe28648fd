"""Prometheus metrics of one server (`GET /metrics`, vLLM-style names under `step3vl:`).

Counters are bumped by the handlers as requests end; the engine's state (running / waiting sequences, KV blocks,
prefix hits, preemptions, images encoded and encoder-cache hits) is read on the engine thread at scrape time. Each server has its own registry, so two
servers in one process never mix their numbers.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest


class ServerMetrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        r, label = self.registry, {"model_name": model_name}

        def counter(name: str, doc: str, *labels: str):
            return Counter(f"step3vl:{name}", doc, ["model_name", *labels], registry=r)

        def gauge(name: str, doc: str):
            return Gauge(f"step3vl:{name}", doc, ["model_name"], registry=r).labels(**label)

        self._choices = counter("choices_finished", "Choices (samples) that ended, by finish reason", "finished_reason")
        self._errors = counter("request_errors", "Requests refused or failed, by HTTP status", "status")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests").labels(**label)
        self.generation_tokens = counter("generation_tokens", "Generated tokens of finished requests").labels(**label)
        self.running = gauge("num_requests_running", "Sequences in the running batch")
        self.waiting = gauge("num_requests_waiting", "Sequences waiting for admission")
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of the KV pool's blocks in use")
        self.kv_blocks = gauge("kv_cache_blocks_total", "Blocks in the KV pool")
        self.prefix_hits = gauge("prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache (since start)")
        self.preemptions = gauge("num_preemptions", "Sequences preempted (since start)")
        self.images_encoded = gauge("images_encoded", "Images run through the vision encoder (since start)")
        self.encoder_cache_hits = gauge("encoder_cache_hits", "Images whose features came from the encoder cache")
        self._label = label

    def finished(self, finish_reasons: list[str | None], prompt_tokens: int, generated_tokens: int) -> None:
        for reason in finish_reasons:
            self._choices.labels(finished_reason=reason or "unknown", **self._label).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generated_tokens)

    def error(self, status: int) -> None:
        self._errors.labels(status=str(status), **self._label).inc()

    def render(self, engine_state: dict) -> bytes:
        self.running.set(engine_state["running"])
        self.waiting.set(engine_state["waiting"])
        self.kv_blocks.set(engine_state["blocks_total"])
        self.kv_usage.set(engine_state["blocks_used"] / max(engine_state["blocks_total"], 1))
        self.prefix_hits.set(engine_state["prefix_hit_tokens"])
        self.preemptions.set(engine_state["preemptions"])
        self.images_encoded.set(engine_state["images_encoded"])
        self.encoder_cache_hits.set(engine_state["encoder_cache_hits"])
        return generate_latest(self.registry)


def engine_state(llm) -> dict:
    """Runs on the engine thread (`AsyncLLM.call`)."""
    if llm.is_sleeping():
        return {**llm.kv_stats(), "running": 0, "waiting": 0}
    sched = llm.engine.scheduler
    return {**llm.kv_stats(), "running": len(sched.running), "waiting": len(sched.waiting)}

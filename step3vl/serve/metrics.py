"""Prometheus metrics of one server (`GET /metrics`): the project's own under `step3vl:`, and vLLM's names and
meanings under `vllm:` (requests, tokens, KV usage, prefix-cache hits, preemptions, and histograms of time to first
token, inter-token latency, end-to-end latency and queue time), so vLLM's Grafana dashboards and alerts work.

Counters and histograms are fed by the handlers as requests end (from each RequestOutput's metrics); the engine's
state (running / waiting sequences, KV blocks, prefix hits, preemptions, images encoded and encoder-cache hits) is
read on the engine thread at scrape time. Each server has its own registry, so two servers in one process never mix
their numbers.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# vLLM's histogram buckets (seconds), so dashboards' quantiles line up.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0)


class VllmMetrics:
    """The same numbers under vLLM's metric names (model_name label as vLLM's)."""

    def __init__(self, registry: CollectorRegistry, label: dict):
        def counter(name: str, doc: str, *labels: str):
            return Counter(f"vllm:{name}", doc, ["model_name", *labels], registry=registry)

        def gauge(name: str, doc: str):
            return Gauge(f"vllm:{name}", doc, ["model_name"], registry=registry).labels(**label)

        def histogram(name: str, doc: str, buckets):
            return Histogram(f"vllm:{name}", doc, ["model_name"], buckets=buckets, registry=registry).labels(**label)

        self.label = label
        self.request_success = counter("request_success", "Finished requests, by finish reason", "finished_reason")
        self.prompt_tokens = counter("prompt_tokens", "Prefill tokens processed").labels(**label)
        self.generation_tokens = counter("generation_tokens", "Generation tokens processed").labels(**label)
        self.running = gauge("num_requests_running", "Requests in the running batch")
        self.waiting = gauge("num_requests_waiting", "Requests waiting to be processed")
        self.kv_usage = gauge("kv_cache_usage_perc", "KV-cache usage; 1 means 100 percent")
        self.gpu_cache_usage = gauge("gpu_cache_usage_perc", "KV-cache usage (vLLM's older name)")
        self.prefix_hits = gauge("prefix_cache_hits_total", "Prompt tokens served from the prefix cache")
        self.prefix_queries = gauge("prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache")
        self.preemptions = gauge("num_preemptions_total", "Cumulative number of preemptions")
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token", TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between output tokens", ITL_BUCKETS)
        self.tpot = histogram("time_per_output_token_seconds", "Time per output token (vLLM's older name)",
                              ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "End-to-end request latency", LATENCY_BUCKETS)
        self.queue = histogram("request_queue_time_seconds", "Time spent waiting before the first prefill",
                               LATENCY_BUCKETS)

    def observe(self, metrics: dict) -> None:
        """One finished request's RequestOutput.metrics."""
        for hist, key in ((self.ttft, "time_to_first_token"), (self.e2e, "e2e_latency"),
                          (self.queue, "queue_time")):
            if metrics.get(key) is not None:
                hist.observe(metrics[key])
        itl = metrics.get("inter_token_latency")
        if itl is not None:
            for _ in range(max(metrics.get("output_tokens", 1) - 1, 1)):  # one observation per interval, as vLLM
                self.itl.observe(itl)
                self.tpot.observe(itl)

    def render(self, state: dict) -> None:
        usage = state["blocks_used"] / max(state["blocks_total"], 1)
        self.running.set(state["running"])
        self.waiting.set(state["waiting"])
        self.kv_usage.set(usage)
        self.gpu_cache_usage.set(usage)
        self.prefix_hits.set(state["prefix_hit_tokens"])
        self.prefix_queries.set(state["prefix_hit_tokens"] + state["prefill_tokens_computed"])
        self.preemptions.set(state["preemptions"])


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
        self.vllm = VllmMetrics(r, label)

    def finished(self, finish_reasons: list[str | None], prompt_tokens: int, generated_tokens: int,
                 request_metrics: list[dict] = ()) -> None:
        """Choices that ended and their tokens; request_metrics: each finished request's RequestOutput.metrics."""
        for reason in finish_reasons:
            self._choices.labels(finished_reason=reason or "unknown", **self._label).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generated_tokens)
        self.vllm.prompt_tokens.inc(prompt_tokens)
        self.vllm.generation_tokens.inc(generated_tokens)
        for m in request_metrics:
            self.vllm.observe(m)
        for reason in finish_reasons:
            self.vllm.request_success.labels(finished_reason=reason or "abort", **self._label).inc()

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
        self.vllm.render(engine_state)
        return generate_latest(self.registry)


def engine_state(llm) -> dict:
    """Runs on the engine thread (`AsyncLLM.call`)."""
    if llm.is_sleeping():
        return {**llm.kv_stats(), "running": 0, "waiting": 0}
    sched = llm.engine.scheduler
    return {**llm.kv_stats(), "running": len(sched.running), "waiting": len(sched.waiting)}

"""The server's side routes: API key, /tokenize and /detokenize against the in-process processor, /metrics
counting what was served, /version."""

from __future__ import annotations

import base64
import json
import io

import httpx
import openai
import pytest
from PIL import Image

from step3vl import __version__
from step3vl.engine import LLM, AsyncLLM
from step3vl.serve import OpenAIServer, ServerConfig
from step3vl.serve.background import BackgroundServer

MODEL = "tiny"
USER = [{"role": "user", "content": "Count the sides of a square."}]


def test_tokenize_and_detokenize_match_the_processor(server, reference):
    _, url = server
    r = httpx.post(url + "/tokenize", json={"messages": USER}).json()
    text, _ = reference.processor.apply_chat_template(USER)
    assert r["tokens"] == reference.prepare({"prompt": text}).token_ids and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 512
    r2 = httpx.post(url + "/tokenize", json={"prompt": "plain words"}).json()
    assert r2["tokens"] == reference.prepare("plain words").token_ids
    back = httpx.post(url + "/detokenize", json={"tokens": r2["tokens"]}).json()
    assert back["prompt"] == reference.get_tokenizer().decode(r2["tokens"])
    bad = httpx.post(url + "/detokenize", json={"tokens": [1, 10**6]})
    assert bad.status_code == 400 and "outside the vocabulary" in bad.json()["error"]["message"]


def test_metrics_count_what_was_served(server, client):
    _, url = server

    def scrape() -> dict[str, float]:
        text = httpx.get(url + "/metrics").text
        return {line.split(" ")[0]: float(line.split(" ")[-1]) for line in text.splitlines()
                if line.startswith("step3vl:")}

    before = scrape()
    r = client.chat.completions.create(model=MODEL, messages=USER, n=2, max_tokens=7, seed=1)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=USER, max_tokens=10**6)
    after = scrape()
    label = f'{{model_name="{MODEL}"}}'

    def grew(name: str, labels: str = label) -> float:
        key = f"step3vl:{name}{labels}"
        return after[key] - before.get(key, 0.0)

    assert grew("generation_tokens_total") == r.usage.completion_tokens == 14
    assert grew("prompt_tokens_total") == r.usage.prompt_tokens
    assert grew("choices_finished_total", f'{{finished_reason="length",model_name="{MODEL}"}}') == 2  # n = 2
    assert grew("request_errors_total", f'{{model_name="{MODEL}",status="400"}}') == 1
    assert after[f"step3vl:kv_cache_blocks_total{label}"] > 0
    assert after[f"step3vl:num_requests_running{label}"] == 0

    before = after
    for question in ("What is it?", "What colour is it?"):  # one picture, two prompts: encoded once
        client.chat.completions.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": _png_data_url()}}, {"type": "text", "text": question}]}])
    after = scrape()
    assert grew("images_encoded") == 1


def test_metrics_speak_vllms_names_with_latency_histograms(server, client):
    """vLLM's dashboards read vllm:* names: the counters, gauges and the four latency histograms, fed by real
    requests (streamed and not)."""
    _, url = server

    def scrape() -> dict[str, float]:
        text = httpx.get(url + "/metrics").text
        return {line.split(" ")[0]: float(line.split(" ")[-1]) for line in text.splitlines()
                if line.startswith("vllm:")}

    label = f'{{model_name="{MODEL}"}}'
    before = scrape()
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=6, seed=2)
    stream = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=5, seed=3, stream=True,
                                            stream_options={"include_usage": True})
    streamed_tokens = [c.usage.completion_tokens for c in stream if c.usage][-1]
    after = scrape()

    def grew(name: str, labels: str = label) -> float:
        return after[f"vllm:{name}{labels}"] - before.get(f"vllm:{name}{labels}", 0.0)

    assert grew("generation_tokens_total") == r.usage.completion_tokens + streamed_tokens == 11
    assert grew("request_success_total", f'{{finished_reason="length",model_name="{MODEL}"}}') == 2
    for hist in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert grew(f"{hist}_count") == 2, hist
        assert grew(f"{hist}_sum") > 0, hist
    assert grew("inter_token_latency_seconds_count") == (6 - 1) + (5 - 1)  # one per interval between tokens
    assert grew("e2e_request_latency_seconds_sum") >= grew("time_to_first_token_seconds_sum")
    assert after[f"vllm:num_requests_running{label}"] == 0 and f"vllm:kv_cache_usage_perc{label}" in after
    assert f"vllm:prefix_cache_queries_total{label}" in after and f"vllm:num_preemptions_total{label}" in after


def _png_data_url() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_version(server):
    assert httpx.get(server[1] + "/version").json() == {"version": __version__}


@pytest.fixture(scope="module")
def locked(tiny_ckpt):
    engine = AsyncLLM(LLM(tiny_ckpt, kv_cache_memory="8MiB", max_model_len=512))
    srv = OpenAIServer(engine, ServerConfig(served_model_name=MODEL, api_key="sesame"))
    with BackgroundServer(srv.app) as url:
        yield url
    engine.shutdown()


def test_api_key_guards_the_api_but_not_health(locked):
    with pytest.raises(openai.AuthenticationError, match="API key"):
        openai.OpenAI(base_url=locked + "/v1", api_key="wrong", max_retries=0).models.list()
    ok = openai.OpenAI(base_url=locked + "/v1", api_key="sesame", max_retries=0)
    assert ok.chat.completions.create(model=MODEL, messages=USER, max_tokens=2).usage.completion_tokens == 2
    assert httpx.post(locked + "/tokenize", json={"prompt": "x"}).status_code == 401
    assert httpx.get(locked + "/health").status_code == 200


def test_docs_are_off_behind_an_api_key_and_on_without(locked, server):
    for route in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(locked + route).status_code == 404
        assert httpx.get(locked + route, headers={"Authorization": "Bearer sesame"}).status_code == 404
    assert httpx.get(server[1] + "/openapi.json").status_code == 200  # an open server keeps them


def test_a_body_that_is_not_json_is_a_400_without_internals(server):
    body = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 2})
    r = httpx.post(server[1] + "/v1/completions", content=body)  # no Content-Type
    assert r.status_code == 400
    msg = r.json()["error"]["message"]
    assert msg.startswith("request body: ") and "Content-Type: application/json" in msg
    assert ".py" not in r.text and "line" not in msg


def test_sleep_mode_endpoints(tiny_ckpt, server):
    """--enable-sleep-mode: /sleep frees the pool, requests get a 503 naming the sleep (streams too, before they
    start), /metrics keeps answering, /wake_up restores the same answers; the endpoints exist only with the flag."""
    engine = AsyncLLM(LLM(tiny_ckpt, kv_cache_memory="8MiB", max_model_len=512))
    srv = OpenAIServer(engine, ServerConfig(served_model_name=MODEL, enable_sleep_mode=True))
    chat = dict(model=MODEL, messages=USER, max_tokens=6, temperature=0)
    with BackgroundServer(srv.app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        before = client.chat.completions.create(**chat).choices[0].message
        assert httpx.get(url + "/is_sleeping").json() == {"is_sleeping": False}
        r = httpx.post(url + "/sleep", params={"level": 1}).json()
        assert r["is_sleeping"] and r["bytes_freed"] > 0
        assert httpx.get(url + "/is_sleeping").json() == {"is_sleeping": True}
        for stream in (False, True):
            with pytest.raises(openai.InternalServerError) as err:
                client.chat.completions.create(**chat, stream=stream)
            assert err.value.status_code == 503 and "asleep" in err.value.message
        assert httpx.get(url + "/metrics").status_code == 200
        bad = httpx.post(url + "/sleep", params={"level": 3})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "level"
        bad = httpx.post(url + "/wake_up", params={"tags": "gpu"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "tags"
        assert httpx.post(url + "/wake_up", params={"tags": ["weights", "kv_cache"]}).json() == {"is_sleeping": False}
        after = client.chat.completions.create(**chat).choices[0].message
        assert (after.content, after.reasoning_content) == (before.content, before.reasoning_content)
    engine.shutdown()
    assert httpx.post(server[1] + "/sleep").status_code == 404  # the shared server runs without the flag

"""Server limits that hold: samples counted over every prompt of a request, a body over the size limit refused
with a 413 before it is read whole (with or without a Content-Length), a prompt over the character limit refused
before it is tokenized."""

from __future__ import annotations

import time

import httpx
import pytest

from step3vl.engine import LLM, AsyncLLM
from step3vl.serve import OpenAIServer, ServerConfig
from step3vl.serve.background import BackgroundServer

from .conftest import ENGINE, MODEL


@pytest.fixture(scope="module")
def limited(tiny_ckpt):
    engine = AsyncLLM(LLM(tiny_ckpt, **ENGINE))
    srv = OpenAIServer(engine, ServerConfig(served_model_name=MODEL, max_n=64, max_body_bytes=20_000,
                                            max_prompt_chars=2_000, body_timeout_s=1.0))
    with BackgroundServer(srv.app) as url:
        yield url
    engine.shutdown()


def test_max_n_counts_every_prompt_of_a_request(limited):
    r = httpx.post(limited + "/v1/completions", json={"model": MODEL, "prompt": ["a", "b", "c"], "n": 30,
                                                      "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    assert "n × prompts = 30 × 3 = 90 is over this server's limit of 64" in r.json()["error"]["message"]
    ok = httpx.post(limited + "/v1/completions", json={"model": MODEL, "prompt": ["a", "b"], "n": 32,
                                                       "max_tokens": 1})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 64


def test_a_body_over_the_limit_is_a_413_at_once(limited):
    big = {"model": MODEL, "prompt": "x" * 30_000, "max_tokens": 1}
    r = httpx.post(limited + "/v1/completions", json=big)
    assert r.status_code == 413 and "over this server's limit of 20000 bytes" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: counted as it arrives
        yield b'{"model": "' + MODEL.encode() + b'", "prompt": "'
        for _ in range(30):
            yield b"y" * 1000
        yield b'"}'

    r = httpx.post(limited + "/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["type"] == "RequestTooLarge"


def test_an_over_long_prompt_is_refused_before_tokenizing(limited):
    t0 = time.perf_counter()
    r = httpx.post(limited + "/v1/chat/completions", json={
        "model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "word " * 3_000}]})
    assert r.status_code == 400 and "it was not tokenized" in r.json()["error"]["message"]
    assert "over this server's limit of 2000" in r.json()["error"]["message"] and time.perf_counter() - t0 < 5
    fine = httpx.post(limited + "/v1/chat/completions", json={
        "model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "word " * 10}]})
    assert fine.status_code == 200


def test_a_stalled_body_is_a_408(limited):
    """A client that sends its headers and part of its body, then nothing: answered 408 once the body stalls."""
    import socket
    from urllib.parse import urlparse

    u = urlparse(limited)
    with socket.create_connection((u.hostname, u.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"model\": ")
        t0 = time.perf_counter()
        reply = sock.recv(4096).decode()
    assert reply.startswith("HTTP/1.1 408") and "stalled for 1 s" in reply
    assert 0.5 < time.perf_counter() - t0 < 8


def test_the_body_timeout_never_cuts_a_long_answer(tiny_ckpt):
    """Once the body is in, the app waits for a disconnect for as long as its answer takes: a stream longer than
    body_timeout_s ends normally."""
    engine = AsyncLLM(LLM(tiny_ckpt, **ENGINE))
    srv = OpenAIServer(engine, ServerConfig(served_model_name=MODEL, body_timeout_s=0.05))
    try:
        with BackgroundServer(srv.app) as url:
            t0 = time.perf_counter()
            with httpx.stream("POST", url + "/v1/completions", timeout=60, json={
                    "model": MODEL, "prompt": "once", "max_tokens": 120, "ignore_eos": True, "stream": True}) as r:
                lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
            assert time.perf_counter() - t0 > 0.05
            assert r.status_code == 200 and lines[-1] == "data: [DONE]"
            assert '"finish_reason": "length"' in "".join(lines)  # all 120 tokens, not cut off
    finally:
        engine.shutdown()

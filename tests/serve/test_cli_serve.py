"""`step3vl serve` as a user starts it: a separate process, the official client, a base and a PaCoRe model."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served_cli(tiny_ckpt):
    port = _free_port()
    # `serve MODEL` (positional, as `vllm serve MODEL`) with vLLM's engine flags
    cmd = [sys.executable, "-m", "step3vl.cli", "serve", str(tiny_ckpt), "--port", str(port), "--seed", "3",
           "--max-num-seqs", "8", "--gpu-memory-utilization", "0.5", "--tensor-parallel-size", "1",
           "--served-model-name", "tiny", "--pacore-presets", "low", "--think-at", "6", "--pacore-max-tokens", "12",
           "--message-max-tokens", "5", "--kv-cache-memory", "8MiB", "--threads", "1", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            pytest.fail(f"step3vl serve exited with {proc.returncode}:\n{proc.stdout.read()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("step3vl serve did not become healthy in 120 s")
        time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_serve_answers_the_base_and_the_pacore_model(served_cli):
    client = openai.OpenAI(base_url=served_cli + "/v1", api_key="x", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == ["tiny", "tiny-pacore-low"]
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=10,
                                       seed=1)
    # --think-at 6: the random model closes its reasoning at output position 6, then answers
    assert r.choices[0].message.reasoning_content and r.choices[0].message.content
    p = client.chat.completions.create(model="tiny-pacore-low", messages=[{"role": "user", "content": "hi"}],
                                       seed=2)
    record = p.model_extra["pacore"]
    assert record["error"] is None and [rd["k"] for rd in record["rounds"]] == [4, 1]
    assert p.choices[0].message.content == record["final_response"] != ""
    assert p.usage.completion_tokens == record["effective_ttc"] == 5 * 12


def test_serve_refuses_two_models_and_tensor_parallelism(tiny_ckpt, capsys):
    from step3vl.cli import main

    assert main(["serve", str(tiny_ckpt), "--model", "/elsewhere"]) == 2
    assert "two models" in capsys.readouterr().err
    assert main(["serve", str(tiny_ckpt), "--tensor-parallel-size", "2", "--kv-cache-memory", "8MiB"]) == 2
    assert "tensor_parallel_size 2: this engine runs on one GPU" in capsys.readouterr().err


def test_serve_without_a_model_says_what_to_give(capsys):
    from step3vl.cli import main

    assert main(["serve"]) == 2
    assert "give --model DIR (a checkpoint directory) or --demo" in capsys.readouterr().err


def test_a_chat_template_flag_replaces_the_checkpoints(tiny_ckpt, tmp_path):
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}assistant:{% endif %}")
    port = _free_port()
    cmd = [sys.executable, "-m", "step3vl.cli", "serve", "--model", str(tiny_ckpt), "--port", str(port),
           "--pacore-presets", "", "--chat-template", str(template), "--kv-cache-memory", "8MiB", "--threads", "1",
           "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else ""
                time.sleep(0.2)
        got = httpx.post(url + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()["tokens"]
        want = httpx.post(url + "/tokenize", json={"prompt": "user: hi\nassistant:"}).json()["tokens"]
        assert got == want
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_broken_chat_template_is_refused_at_startup(tiny_ckpt, tmp_path, capsys):
    from step3vl.cli import main

    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}")
    assert main(["serve", "--model", str(tiny_ckpt), "--chat-template", str(bad), "--kv-cache-memory", "8MiB"]) == 2
    assert "not a valid Jinja template" in capsys.readouterr().err

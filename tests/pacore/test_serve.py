"""PaCoRe behind the OpenAI-compatible server: a PaCoRe chat model and POST /v1/pacore give the same results as
`PaCoRe.run` in process (same config, same seed), while sharing the engine with plain chat requests."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from step3vl.engine import AsyncLLM
from step3vl.serve import OpenAIServer, ServerConfig
from step3vl.serve.background import BackgroundServer

from step3vl_pacore import PaCoRe, PaCoReConfig, Problem
from step3vl_pacore.serve import CHAT_PROBLEM_ID, PaCoReService

QUESTION = [{"role": "user", "content": "Which letter?"}]


@pytest.fixture
def base_config(script, hook):
    return PaCoReConfig(rounds=[3], max_tokens=24, message_max_tokens=12,
                        sampling_hook=hook({"*": script(think_at=5)}))


@pytest.fixture
def served(make_llm, base_config):
    engine = AsyncLLM(make_llm(max_model_len=1024))
    srv = OpenAIServer(engine, ServerConfig(served_model_name="m"))
    PaCoReService(srv, base_config, ["low", "high"])
    with BackgroundServer(srv.app) as url:
        yield url, openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
    engine.shutdown()


def _reference(make_llm, config: PaCoReConfig, problems: list[Problem]):
    return PaCoRe(make_llm(max_model_len=1024), config).run(problems)


def test_models_list_the_presets(served):
    _, client = served
    assert [m.id for m in client.models.list().data] == ["m", "m-pacore-low", "m-pacore-high"]


def test_pacore_chat_model_equals_the_in_process_run(served, make_llm, base_config):
    _, client = served
    r = client.chat.completions.create(model="m-pacore-high", messages=QUESTION, seed=7)
    cfg = PaCoReConfig(**{**base_config.__dict__, "rounds": [32, 4], "seed": 7})
    ref = _reference(make_llm, cfg, [Problem(CHAT_PROBLEM_ID, QUESTION)])[0]
    assert ref.ok and ref.final_response
    msg = r.choices[0].message
    assert msg.content == ref.final_response
    assert msg.reasoning_content == ref.final_reasoning_content
    record = r.model_extra["pacore"]
    assert record["round_responses"] == json.loads(json.dumps(ref.round_responses))
    assert [rd["k"] for rd in record["rounds"]] == [32, 4, 1]
    assert r.usage.completion_tokens == ref.effective_ttc and r.usage.prompt_tokens == ref.prompt_tokens


def test_pacore_stream_ends_with_the_same_answer(served):
    _, client = served
    full = client.chat.completions.create(model="m-pacore-low", messages=QUESTION, seed=3)
    chunks = list(client.chat.completions.create(model="m-pacore-low", messages=QUESTION, seed=3, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.delta.content or "" for ch in chunks for c in ch.choices)
    reasoning = "".join(getattr(c.delta, "reasoning_content", None) or "" for ch in chunks for c in ch.choices)
    assert content == full.choices[0].message.content and reasoning == full.choices[0].message.reasoning_content
    assert chunks[-1].model_extra["pacore"]["final_response"] == content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_batch_route_equals_the_in_process_run_beside_plain_requests(served, make_llm, base_config):
    url, client = served
    problems = [{"id": f"p{i}", "messages": [{"role": "user", "content": f"Problem {i}?"}]} for i in range(3)]
    body = {"problems": problems, "rounds": [4, 2], "seed": 5}
    with ThreadPoolExecutor(3) as pool:
        batch = pool.submit(lambda: httpx.post(url + "/v1/pacore", json=body, timeout=300))
        plain = [pool.submit(lambda s=s: client.chat.completions.create(model="m", messages=QUESTION, seed=s,
                                                                        max_tokens=6)) for s in (1, 2)]
        records = batch.result().json()["data"]
        assert all(p.result().usage.completion_tokens == 6 for p in plain)
    cfg = PaCoReConfig(**{**base_config.__dict__, "rounds": [4, 2], "seed": 5})
    ref = _reference(make_llm, cfg, [Problem.from_record(p, "") for p in problems])
    assert [r["request_id"] for r in records] == ["p0", "p1", "p2"]
    for got, want in zip(records, ref):
        assert got["final_response"] == want.final_response and got["error"] is None
        assert got["round_responses"] == json.loads(json.dumps(want.round_responses))


def test_a_bad_problem_fails_alone_in_a_batch(served):
    url, _ = served
    body = {"problems": [{"id": "ok", "messages": QUESTION}, {"id": "empty", "messages": []}], "preset": "low"}
    data = httpx.post(url + "/v1/pacore", json=body, timeout=300).json()["data"]
    assert data[0]["error"] is None and data[0]["final_response"]
    assert "empty problem" in data[1]["error"]


@pytest.mark.parametrize("body, param", [
    ({"problems": [], "rounds": [64, 8]}, "rounds"),  # 73 trajectories: over the default limit of 64
    ({"problems": [], "preset": "extreme"}, "preset"),
    ({"problems": [], "rounds": [0]}, "rounds"),
    ({"problems": [], "preset": "low", "rounds": [2]}, "rounds"),
    ({"problems": [{"id": "a", "messages": QUESTION}, {"id": "a", "messages": QUESTION}]}, "problems"),
])
def test_batch_route_refuses_bad_options(served, body, param):
    r = httpx.post(served[0] + "/v1/pacore", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == param


@pytest.mark.parametrize("kw", [dict(stop=["x"]), dict(logit_bias={"5": 1}), dict(frequency_penalty=0.5),
                                dict(logprobs=True), dict(response_format={"type": "json_object"}),
                                dict(extra_body={"top_k": 5}), dict(extra_body={"guided_choice": ["a"]}),
                                dict(tools=[{"type": "function", "function": {"name": "f"}}])])
def test_pacore_chat_refuses_fields_it_cannot_honour(served, kw):
    _, client = served
    with pytest.raises(openai.BadRequestError, match="not available from a PaCoRe model"):
        client.chat.completions.create(model="m-pacore-low", messages=QUESTION, **kw)


def test_pacore_chat_refuses_n_and_bad_prompts(served):
    _, client = served
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        client.chat.completions.create(model="m-pacore-low", messages=QUESTION, n=2)
    with pytest.raises(openai.BadRequestError, match="empty problem"):
        client.chat.completions.create(model="m-pacore-low", messages=[{"role": "user", "content": " "}])
    with pytest.raises(openai.BadRequestError, match="maximum context length|does not fit"):
        client.chat.completions.create(model="m-pacore-low", messages=[{"role": "user", "content": "w " * 3000}])


def test_unknown_presets_are_refused_at_startup(make_llm, base_config):
    engine = AsyncLLM(make_llm())
    try:
        with pytest.raises(ValueError, match="unknown PaCoRe preset"):
            PaCoReService(OpenAIServer(engine), base_config, ["turbo"])
    finally:
        engine.shutdown()


@pytest.fixture
def served_with(make_llm):
    """A PaCoRe server over a given base config."""
    started = []

    def start(config):
        engine = AsyncLLM(make_llm(max_model_len=1024))
        srv = OpenAIServer(engine, ServerConfig(served_model_name="m"))
        PaCoReService(srv, config, ["low"])
        bg = BackgroundServer(srv.app)
        url = bg.__enter__()
        started.append((bg, engine))
        return url, openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)

    yield start
    for bg, engine in started:
        bg.__exit__(None, None, None)
        engine.shutdown()


def test_stream_equals_the_response_when_the_answer_has_two_think_ends(served_with, script, hook):
    twice = script(think_at=4, answer=lambda c: f" draft</think> The answer is {c}.")
    _, client = served_with(PaCoReConfig(rounds=[3], max_tokens=40, message_max_tokens=20,
                                         sampling_hook=hook({"*": twice})))
    full = client.chat.completions.create(model="m-pacore-low", messages=QUESTION, seed=5)
    msg = full.choices[0].message
    assert "</think>" in msg.reasoning_content  # PaCoRe splits at the last </think>
    chunks = list(client.chat.completions.create(model="m-pacore-low", messages=QUESTION, seed=5, stream=True))
    reasoning = "".join(getattr(c.delta, "reasoning_content", None) or "" for ch in chunks for c in ch.choices)
    content = "".join(c.delta.content or "" for ch in chunks for c in ch.choices)
    assert (reasoning, content) == (msg.reasoning_content, msg.content)
    assert [c.finish_reason for ch in chunks for c in ch.choices if c.finish_reason] == [full.choices[0].finish_reason]


def test_a_method_failure_is_a_500_with_the_record(served_with, script, hook):
    url, client = served_with(PaCoReConfig(rounds=[2], max_tokens=8, sampling_hook=hook({"*": script(close=False)})))
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model="m-pacore-low", messages=QUESTION, seed=1)
    err = e.value.body
    assert err["type"] == "PaCoReError" and "none of its 4 trajectories yielded a message" in err["message"]
    assert [r["k"] for r in err["pacore"]["rounds"]] == [4]
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=60,
                      json={"model": "m-pacore-low", "messages": QUESTION, "stream": True}) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["type"] == "PaCoReError"


def test_batch_problems_without_messages_fail_alone(served):
    url, _ = served
    body = {"problems": [{"id": "ok", "messages": QUESTION}, {"id": "none"}], "preset": "low"}
    r = httpx.post(url + "/v1/pacore", json=body, timeout=300)
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert data[0]["error"] is None and "messages" in data[1]["error"]


def test_a_batch_client_that_leaves_aborts_its_rounds(served_with, script, hook):
    long = script(think_at=200)
    url, _ = served_with(PaCoReConfig(rounds=[8], max_tokens=400, sampling_hook=hook({"*": long})))
    body = {"problems": [{"id": f"p{i}", "messages": QUESTION} for i in range(6)], "preset": "low"}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/pacore", json=body, timeout=httpx.Timeout(60, read=0.5))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        stats = httpx.get(url + "/stats").json()
        if stats["blocks_used"] == 0:
            break
        time.sleep(0.1)
    assert stats["blocks_used"] == 0


def test_run_problem_from_plain_asyncio_equals_the_runner(make_llm, base_config):
    import asyncio

    from step3vl_pacore.serve import run_problem

    problem = Problem("q", QUESTION)
    engine = AsyncLLM(make_llm(max_model_len=1024))
    try:
        got = asyncio.run(run_problem(engine, base_config, problem))
    finally:
        engine.shutdown()
    want = _reference(make_llm, base_config, [problem])[0]
    assert got.ok and got.final_response == want.final_response
    assert got.round_responses == want.round_responses


def test_a_batch_over_the_problem_limit_is_refused(make_llm, base_config):
    engine = AsyncLLM(make_llm(max_model_len=1024))
    srv = OpenAIServer(engine, ServerConfig(served_model_name="m"))
    PaCoReService(srv, base_config, ["low"], max_problems=2)
    try:
        with BackgroundServer(srv.app) as url:
            problems = [{"id": str(i), "messages": QUESTION} for i in range(3)]
            r = httpx.post(url + "/v1/pacore", json={"problems": problems, "preset": "low"}, timeout=60)
            assert r.status_code == 400 and r.json()["error"]["param"] == "problems"
            assert "3 problems are over this server's limit of 2 per request" in r.json()["error"]["message"]
    finally:
        engine.shutdown()

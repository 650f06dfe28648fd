"""Priority scheduling (vLLM's scheduling_policy="priority"): a request's `priority` (lower first, then arrival)
orders admission and preemption; outputs stay those of the request run alone (seeded), and an FCFS engine
refuses a priority rather than ignoring it."""

from __future__ import annotations

import asyncio

import pytest

from step3vl import LLM, SamplingParams
from step3vl.engine import AsyncLLM

PARAMS = SamplingParams(temperature=0.8, seed=7, max_tokens=12, ignore_eos=True)
PROMPTS = ["first to arrive", "second to arrive", "third to arrive"]


def _llm(ckpt, **kw) -> LLM:
    return LLM(ckpt, dtype="float32", device="cpu", **{"kv_cache_memory": "4MiB", "scheduling_policy": "priority",
                                                         **kw})


def _finish_order(llm: LLM, priorities: list[int]) -> tuple[list[str], dict]:
    ids = [llm.add_request(p, PARAMS, request_id=p, priority=pr) for p, pr in zip(PROMPTS, priorities)]
    order, outs = [], {}
    while llm.has_unfinished_requests():
        for out in llm.step():
            if out.finished:
                order.append(out.request_id)
                outs[out.request_id] = out.outputs[0].token_ids
    assert sorted(order) == sorted(ids)
    return order, outs


def test_admission_follows_priority_then_arrival(tiny_ckpt):
    alone = {p: LLM(tiny_ckpt, dtype="float32", device="cpu", kv_cache_memory="4MiB")
             .generate([p], PARAMS, use_tqdm=False)[0].outputs[0].token_ids for p in PROMPTS}
    order, outs = _finish_order(_llm(tiny_ckpt, max_num_seqs=1), [5, 0, 1])
    assert order == [PROMPTS[1], PROMPTS[2], PROMPTS[0]]
    assert outs == alone
    order, _ = _finish_order(_llm(tiny_ckpt, max_num_seqs=1), [2, 2, 1])  # ties: arrival order
    assert order == [PROMPTS[2], PROMPTS[0], PROMPTS[1]]
    order, _ = _finish_order(LLM(tiny_ckpt, dtype="float32", device="cpu", kv_cache_memory="4MiB", max_num_seqs=1),
                             [0, 0, 0])
    assert order == PROMPTS  # fcfs


def test_preemption_takes_the_lowest_priority(tiny_ckpt):
    """A pool too small for both: the later, more urgent request keeps its blocks; the earlier, less urgent one
    is preempted (under FCFS it would be the other way round)."""
    params = SamplingParams(temperature=0.0, max_tokens=120, ignore_eos=True)
    victims = {}
    for policy, priorities in (("priority", [1, 0]), ("fcfs", [0, 0])):
        llm = _llm(tiny_ckpt, kv_cache_memory=16 * 8192, block_size=16, scheduling_policy=policy)  # 16 blocks
        for name, pr in zip(("early", "late"), priorities):
            llm.add_request("a prompt of a few tokens " + name, params, request_id=name, priority=pr)
        seqs = {name: llm.engine.requests[name].sequences[0] for name in ("early", "late")}
        while llm.has_unfinished_requests():
            llm.step()
        victims[policy] = {name: s.num_preemptions for name, s in seqs.items()}
    assert victims["priority"]["late"] == 0 < victims["priority"]["early"]
    assert victims["fcfs"]["early"] == 0 < victims["fcfs"]["late"]


def test_an_urgent_request_does_not_follow_a_less_urgent_prefill(tiny_ckpt):
    llm = _llm(tiny_ckpt)
    llm.add_request("same prompt", PARAMS, request_id="slow", priority=3)
    llm.add_request("same prompt", PARAMS, request_id="urgent", priority=0)
    llm.add_request("same prompt", PARAMS, request_id="later", priority=3)
    reqs = llm.engine.requests
    assert reqs["urgent"].leader is None  # prefills on its own
    assert reqs["later"].leader is reqs["urgent"]  # the most recent leader, at least as urgent
    while llm.has_unfinished_requests():
        llm.step()


def test_priority_is_refused_where_it_cannot_apply(tiny_ckpt):
    fcfs = LLM(tiny_ckpt, dtype="float32", device="cpu", kv_cache_memory="4MiB")
    with pytest.raises(ValueError, match="priority 2 needs scheduling_policy='priority'"):
        fcfs.add_request("x", PARAMS, priority=2)
    with pytest.raises(ValueError, match="2 priorities for 1 prompts"):
        fcfs.generate(["x"], PARAMS, priority=[0, 0])
    with pytest.raises(ValueError, match="priority must be an integer"):
        _llm(tiny_ckpt).add_request("x", PARAMS, priority=1.5)
    with pytest.raises(ValueError, match="scheduling_policy 'lifo'"):
        _llm(tiny_ckpt, scheduling_policy="lifo")
    assert not fcfs.has_unfinished_requests()


def test_async_generate_passes_priority(tiny_ckpt):
    engine = AsyncLLM(_llm(tiny_ckpt))
    long = SamplingParams(max_tokens=400, ignore_eos=True)

    async def main() -> int | None:
        stream = engine.generate("x", long, request_id="r", priority=4)
        first = await anext(stream)  # the request is in the engine now
        seen = await engine.call(lambda llm: llm.engine.requests["r"].priority)
        await stream.aclose()  # aborts it
        assert not first.finished
        return seen

    try:
        assert asyncio.run(main()) == 4
    finally:
        engine.shutdown()


def test_server_requests_carry_their_priority(tiny_ckpt):
    """`priority` in a chat or completion body reaches the engine (a server with --scheduling-policy priority)."""
    openai = pytest.importorskip("openai")
    from step3vl.serve import OpenAIServer, ServerConfig
    from step3vl.serve.background import BackgroundServer

    llm = _llm(tiny_ckpt)
    seen = []
    add = llm.add_request
    llm.add_request = lambda *a, priority=0, **k: seen.append(priority) or add(*a, priority=priority, **k)
    engine = AsyncLLM(llm)
    try:
        with BackgroundServer(OpenAIServer(engine, ServerConfig(served_model_name="m")).app) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=60)
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                           extra_body={"priority": -2})
            client.completions.create(model="m", prompt="hi", max_tokens=2, extra_body={"priority": 5})
    finally:
        engine.shutdown()
    assert seen == [-2, 5]

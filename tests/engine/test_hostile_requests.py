"""One bad request never poisons the engine: malformed prompts are refused where prompts are prepared (before the
scheduler or the native block manager see them), a user callback that raises ends its own request and frees its
blocks, and the next good request gets exactly what a fresh engine gives (sync and async)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from step3vl.engine import LLM, AsyncLLM, SamplingParams

GOOD_PROMPT = "a cat sat on the mat"
GREEDY = SamplingParams(max_tokens=6, temperature=0.0)

bad_token = st.one_of(st.floats(allow_nan=True), st.booleans(), st.text(max_size=3), st.none(),
                      st.lists(st.integers(), max_size=2), st.integers(min_value=-(2**70), max_value=-1),
                      st.integers(min_value=10**6, max_value=2**70))
bad_prompt = st.one_of(
    st.lists(st.integers(0, 100), min_size=0, max_size=3).flatmap(
        lambda good: bad_token.map(lambda b: {"prompt_token_ids": good + [b]})),
    st.builds(lambda v: {"prompt_token_ids": v}, st.one_of(st.text(max_size=5), st.integers(), st.none())),
    st.builds(lambda v: {"prompt": v}, st.one_of(st.integers(), st.none(), st.lists(st.integers(), max_size=2))),
    st.just({"text": "wrong key"}), st.just([]), st.just(3.5), st.just(None),
    st.just({"prompt": "<im_patch> two images", "images": ["", ""]}))


@pytest.fixture(scope="module")
def llm(tiny_ckpt):
    return LLM(tiny_ckpt, kv_cache_memory="8MiB")


@pytest.fixture(scope="module")
def fresh_answer(tiny_ckpt):
    return LLM(tiny_ckpt, kv_cache_memory="8MiB").generate([GOOD_PROMPT], GREEDY, use_tqdm=False)[0].outputs[0]


def _assert_clean(llm: LLM, fresh_answer) -> None:
    assert not llm.has_unfinished_requests() and llm.kv_stats()["blocks_used"] == 0
    got = llm.generate([GOOD_PROMPT], GREEDY, use_tqdm=False)[0].outputs[0]
    assert got.token_ids == fresh_answer.token_ids and got.text == fresh_answer.text


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=bad_prompt)
def test_malformed_prompts_are_refused_and_leave_the_engine_as_fresh(llm, fresh_answer, prompt):
    with pytest.raises((ValueError, TypeError)):
        llm.generate([prompt], SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises((ValueError, TypeError)):
        llm.add_request(prompt, SamplingParams(max_tokens=2))
    _assert_clean(llm, fresh_answer)


def test_token_ids_are_plain_ints_whatever_integer_type_came_in(llm):
    out = llm.generate([{"prompt_token_ids": [np.int64(3), np.int32(4), 5]}], GREEDY, use_tqdm=False)[0]
    assert out.prompt_token_ids == [3, 4, 5] and all(type(t) is int for t in out.prompt_token_ids)


def _raising_after(k: int):
    def processor(output_ids, row):
        if len(output_ids) >= k:
            raise RuntimeError(f"user code failed after {k} tokens")
        return row
    return processor


@pytest.mark.parametrize("k", [0, 2])
def test_a_raising_logits_processor_ends_only_its_request(llm, fresh_answer, k):
    bad = SamplingParams(n=2, max_tokens=8, logits_processors=[_raising_after(k)])
    outs = llm.generate(["hello there", GOOD_PROMPT], [bad, GREEDY], use_tqdm=False)
    for c in outs[0].outputs:
        assert c.finish_reason == "abort" and len(c.token_ids) == k
        assert c.stop_reason == f"a logits processor raised RuntimeError: user code failed after {k} tokens"
    assert outs[1].outputs[0].token_ids == fresh_answer.token_ids  # the neighbour in the same batch
    _assert_clean(llm, fresh_answer)


def test_the_async_engine_survives_bad_requests(tiny_ckpt, fresh_answer):
    engine = AsyncLLM(LLM(tiny_ckpt, kv_cache_memory="8MiB"))

    async def collect(prompt, params):
        last = None
        async for out in engine.generate(prompt, params):
            last = out
        return last

    async def go():
        with pytest.raises(ValueError, match=r"prompt_token_ids\[1\] = 2\.0"):
            await collect({"prompt_token_ids": [1, 2.0]}, GREEDY)
        bad = SamplingParams(max_tokens=8, logits_processors=[_raising_after(1)])
        return await asyncio.gather(collect("hello there", bad), collect(GOOD_PROMPT, GREEDY))

    try:
        failed, good = asyncio.run(go())
        assert failed.outputs[0].finish_reason == "abort" and "RuntimeError" in failed.outputs[0].stop_reason
        assert good.outputs[0].token_ids == fresh_answer.token_ids
        after = asyncio.run(collect(GOOD_PROMPT, GREEDY))  # the engine thread is alive and clean
        assert after.outputs[0].token_ids == fresh_answer.token_ids
    finally:
        engine.shutdown()

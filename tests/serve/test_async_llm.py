"""AsyncLLM: the engine thread, cumulative streams, aborts, calls and shutdown, against the in-process LLM."""

from __future__ import annotations

import asyncio
import threading

import pytest

from step3vl.engine import LLM, AsyncLLM, EngineDeadError, SamplingParams

ENGINE = dict(kv_cache_memory="8MiB", max_model_len=512)  # as in conftest.py


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    e = AsyncLLM(LLM(tiny_ckpt, **ENGINE))
    yield e
    e.shutdown()


async def _collect(engine, prompt, params, rid=None):
    outs = []
    async for out in engine.generate(prompt, params, rid):
        outs.append(out)
    return outs


def test_streams_grow_and_end_equal_to_the_reference(engine, reference):
    params = SamplingParams(n=2, seed=21, max_tokens=12)
    outs = asyncio.run(_collect(engine, "a cat sat", params))
    ref = reference.generate("a cat sat", params, use_tqdm=False)[0]
    assert outs[-1].finished and not any(o.finished for o in outs[:-1])
    for i in range(2):
        texts = [o.outputs[i].text for o in outs]
        assert all(b.startswith(a) for a, b in zip(texts, texts[1:])), "a stream's text only grows"
        assert outs[-1].outputs[i].token_ids == ref.outputs[i].token_ids
        assert outs[-1].outputs[i].text == ref.outputs[i].text


def test_many_concurrent_requests_from_two_event_loops(engine, reference):
    prompts = [f"count to {i}" for i in range(6)]

    async def batch(ids):
        return await asyncio.gather(*(_collect(engine, prompts[i], SamplingParams(seed=i, max_tokens=6 + i))
                                      for i in ids))

    results = {}
    threads = [threading.Thread(target=lambda ids=ids: results.update(zip(ids, asyncio.run(batch(ids)))))
               for ids in ([0, 1, 2], [3, 4, 5])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, p in enumerate(prompts):
        ref = reference.generate(p, SamplingParams(seed=i, max_tokens=6 + i), use_tqdm=False)[0]
        assert results[i][-1].outputs[0].token_ids == ref.outputs[0].token_ids


def test_a_bad_prompt_raises_before_any_output_and_harms_nothing(engine):
    async def go():
        with pytest.raises(ValueError, match="outside the vocabulary"):
            await _collect(engine, [10**9], SamplingParams(max_tokens=2))
        with pytest.raises(ValueError, match="does not fit max_model_len"):
            await _collect(engine, [7] * 600, SamplingParams(max_tokens=2))
        return await _collect(engine, "still fine", SamplingParams(max_tokens=3))

    assert len(asyncio.run(go())[-1].outputs[0].token_ids) == 3


def test_leaving_a_stream_aborts_the_request_and_frees_its_kv(engine):
    async def go():
        stream = engine.generate("a long story", SamplingParams(n=3, max_tokens=400, ignore_eos=True), "leaver")
        first = await stream.__anext__()
        await stream.aclose()
        for _ in range(200):
            stats = await engine.call(lambda llm: (llm.has_unfinished_requests(), llm.kv_stats()["blocks_used"]))
            if stats == (False, 0):
                return first, stats
            await asyncio.sleep(0.01)
        return first, stats

    first, stats = asyncio.run(go())
    assert not first.finished
    assert stats == (False, 0)


def test_duplicate_request_ids_are_refused_without_harming_the_first(engine):
    async def go():
        a = engine.generate("x", SamplingParams(max_tokens=40, ignore_eos=True), "same")
        await a.__anext__()
        with pytest.raises(ValueError, match="already in use"):
            await _collect(engine, "y", SamplingParams(max_tokens=2), "same")
        last = None
        async for last in a:
            pass
        return last

    out = asyncio.run(go())
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 40


def test_a_caller_whose_loop_closed_does_not_kill_the_engine(engine):
    def slow(llm):
        import time
        time.sleep(0.3)
        return 1

    async def impatient():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(engine.call(slow), 0.05)

    asyncio.run(impatient())  # the loop closes before the engine answers
    import time
    time.sleep(0.5)
    assert engine.is_running
    assert asyncio.run(_collect(engine, "alive", SamplingParams(max_tokens=2)))[-1].finished


def test_call_returns_values_and_raises_errors(engine):
    async def go():
        assert await engine.call(lambda llm: llm.max_model_len) == 512
        with pytest.raises(ZeroDivisionError):
            await engine.call(lambda llm: 1 / 0)

    asyncio.run(go())
    assert engine.is_running


def test_shutdown_ends_streams_with_engine_dead(tiny_ckpt):
    e = AsyncLLM(LLM(tiny_ckpt, **ENGINE))

    async def go():
        stream = e.generate("forever", SamplingParams(max_tokens=400, ignore_eos=True))
        await stream.__anext__()
        await asyncio.to_thread(e.shutdown)
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass
        with pytest.raises(EngineDeadError):
            await _collect(e, "after", SamplingParams(max_tokens=2))

    asyncio.run(go())
    assert not e.is_running


def test_requests_racing_a_shutdown_fail_instead_of_hanging(tiny_ckpt):
    e = AsyncLLM(LLM(tiny_ckpt, **ENGINE))
    e.shutdown()
    e._check_alive = lambda: None  # as if the engine died between the check and the queueing

    async def go():
        with pytest.raises(EngineDeadError):
            await asyncio.wait_for(_collect(e, "late", SamplingParams(max_tokens=2)), 5)
        with pytest.raises(EngineDeadError):
            await asyncio.wait_for(e.call(lambda llm: 1), 5)

    asyncio.run(go())


def test_an_engine_failure_reaches_every_waiter(tiny_ckpt):
    llm = LLM(tiny_ckpt, **ENGINE)
    e = AsyncLLM(llm)

    def broken_step():
        raise RuntimeError("device lost")

    async def go():
        await e.call(lambda llm: setattr(llm, "step", broken_step))
        with pytest.raises(EngineDeadError, match="device lost"):
            await _collect(e, "boom", SamplingParams(max_tokens=4))

    asyncio.run(go())
    assert not e.is_running


def test_final_only_yields_just_the_finished_output(engine, reference):
    async def go():
        outs = []
        async for out in engine.generate("once", SamplingParams(n=2, seed=4, max_tokens=9), final_only=True):
            outs.append(out)
        return outs

    outs = asyncio.run(go())
    ref = reference.generate("once", SamplingParams(n=2, seed=4, max_tokens=9), use_tqdm=False)[0]
    assert len(outs) == 1 and outs[0].finished
    assert [c.token_ids for c in outs[0].outputs] == [c.token_ids for c in ref.outputs]

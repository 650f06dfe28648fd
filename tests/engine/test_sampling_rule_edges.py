"""Where the per-request rules meet each other and the engine's limits: rules that leave no token end that sample
(never the engine, never a NaN draw); log-probs stay the model's own; a reasoning prompt that already closed its
thinking enforces the grammar at once; bad values fail at construction, naming the field."""

from __future__ import annotations

import asyncio

import pytest

from step3vl import LLM, SamplingParams
from step3vl.engine import AsyncLLM


@pytest.fixture(scope="module")
def llm(tiny_ckpt):
    return LLM(tiny_ckpt, kv_cache_memory="8MiB")


def _one(llm, prompt="Go:", **kw):
    return llm.generate([prompt], SamplingParams(**kw), use_tqdm=False)[0].outputs[0]


@pytest.mark.parametrize("kw", [
    dict(min_tokens=5, structured_outputs={"choice": ["a"]}),            # the grammar wants EOS, min_tokens bans it
    dict(allowed_token_ids=[20, 21], structured_outputs={"regex": "z+"}),  # nothing both allow
    dict(allowed_token_ids=[501], min_tokens=2),                          # only EOS allowed, and banned
], ids=["grammar-vs-min_tokens", "grammar-vs-allowed", "allowed-vs-min_tokens"])
def test_rules_that_leave_no_token_end_the_sample_not_the_engine(llm, kw):
    assert 501 in llm.engine.eos_token_ids
    out = llm.generate(["Go:", "Other:"], [SamplingParams(max_tokens=8, logprobs=1, **kw),
                                           SamplingParams(max_tokens=6, seed=1)], use_tqdm=False)
    c = out[0].outputs[0]
    assert c.finish_reason == "abort" and "no token is allowed" in c.stop_reason
    assert all(t >= 0 for t in c.token_ids) and all(v == v for d in c.logprobs for v in d.values())  # no NaN
    assert len(out[1].outputs[0].token_ids) == 6  # the other request is untouched
    assert not llm.has_unfinished_requests()


def test_a_completed_grammar_with_ignore_eos_goes_on_unconstrained(llm):
    c = _one(llm, max_tokens=6, ignore_eos=True, seed=3, structured_outputs={"choice": ["ab"]})
    assert c.finish_reason == "length" and len(c.token_ids) == 6 and c.text.startswith("ab")


def test_the_engine_thread_survives_a_rule_conflict(tiny_ckpt):
    engine = AsyncLLM(LLM(tiny_ckpt, kv_cache_memory="8MiB"))

    async def go():
        async def last(params):
            out = None
            async for out in engine.generate("Go:", params):
                pass
            return out
        return await asyncio.gather(last(SamplingParams(max_tokens=4, min_tokens=3, structured_outputs={"choice": ["a"]})),
                                    last(SamplingParams(max_tokens=5, seed=2)))

    try:
        bad, good = asyncio.run(go())
        assert bad.outputs[0].finish_reason == "abort" and len(good.outputs[0].token_ids) == 5
        assert engine.is_running
    finally:
        engine.shutdown()


def test_logprobs_are_the_models_own_whatever_the_rules(llm):
    """vLLM's default: a biased, penalized draw still reports the model's log-prob of the token it drew."""
    biased = _one(llm, temperature=0, max_tokens=5, logprobs=0, logit_bias={40: 8.0}, repetition_penalty=1.5)
    assert 40 in biased.token_ids  # the bias did steer the draw
    prompt_ids = llm.prepare("Go:").token_ids
    scored = llm.generate([prompt_ids + biased.token_ids], SamplingParams(max_tokens=1, prompt_logprobs=0),
                          use_tqdm=False)[0].prompt_logprobs
    for k, (t, d) in enumerate(zip(biased.token_ids, biased.logprobs)):
        assert d[t] == pytest.approx(scored[len(prompt_ids) + k][t], abs=1e-4)


def test_a_prompt_that_already_closed_its_reasoning_is_guided_at_once(llm):
    think = llm.get_tokenizer().think_end_id
    ids = llm.prepare("Go:").token_ids + [think]
    spec = {"choice": ["yes", "no"], "after_token": think}
    out = llm.generate([ids], SamplingParams(max_tokens=8, seed=4, structured_outputs=spec), use_tqdm=False)[0]
    assert out.outputs[0].text in ("yes", "no")


def test_prompt_logprobs_of_a_one_token_prompt(llm):
    assert llm.generate([[7]], SamplingParams(max_tokens=1, prompt_logprobs=2), use_tqdm=False)[0].prompt_logprobs == [None]


@pytest.mark.parametrize("kw, field", [
    (dict(logit_bias=[(1, 2.0)]), "logit_bias"), (dict(logit_bias={1: "2"}), "logit_bias"),
    (dict(stop_token_ids=5), "stop_token_ids"), (dict(allowed_token_ids={1, 2}), "allowed_token_ids"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(structured_outputs={"choice": "abc"}), "structured_outputs"),
    (dict(structured_outputs={"regex": "a", "after_token": -5}), "structured_outputs"),
])
def test_bad_values_fail_at_construction(kw, field):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        SamplingParams(**kw)


def test_engine_limits_name_the_field(llm):
    with pytest.raises(ValueError, match="SamplingParams.logprobs = 21: more than max_logprobs"):
        _one(llm, logprobs=21)
    with pytest.raises(ValueError, match="after_token 100000 is outside the vocabulary"):
        _one(llm, structured_outputs={"regex": "a", "after_token": 100000})
    assert not llm.has_unfinished_requests()

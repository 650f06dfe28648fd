"""Text the user sees: stop tokens' own text, streaming never shows a stop string it later takes back,
parameters changed after construction, and the final text equals decoding the output tokens."""

from __future__ import annotations

import pytest

from step3vl import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_ckpt) -> LLM:
    return LLM(tiny_ckpt, dtype="float32", device="cpu", kv_cache_memory="2MiB")


PROMPT = list(range(20, 40))


def _greedy(llm, **kw):
    return llm.generate([PROMPT], SamplingParams(temperature=0.0, ignore_eos=True, **kw), use_tqdm=False)[0].outputs[0]


def test_stop_token_text_is_excluded(llm):
    free = _greedy(llm, max_tokens=8)
    stop_tok = free.token_ids[3]
    tok = llm.get_tokenizer()
    c = _greedy(llm, max_tokens=8, stop_token_ids=[stop_tok])
    assert c.finish_reason == "stop" and c.stop_reason == stop_tok and c.token_ids == free.token_ids[:4]
    assert c.text == tok.decode(free.token_ids[:3], skip_special_tokens=True)
    kept = _greedy(llm, max_tokens=8, stop_token_ids=[stop_tok], include_stop_str_in_output=True)
    assert kept.text == tok.decode(free.token_ids[:4], skip_special_tokens=True)


def test_final_text_equals_decode_of_the_tokens(llm):
    tok = llm.get_tokenizer()
    for seed in range(12):
        c = llm.generate([PROMPT], SamplingParams(seed=seed, max_tokens=15, ignore_eos=True), use_tqdm=False)[0].outputs[0]
        assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)


def test_streamed_text_only_grows(llm):
    free = _greedy(llm, max_tokens=12)
    stop = free.text[len(free.text) // 2:][:6]
    assert stop
    llm.add_request(PROMPT, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop=[stop]),
                    request_id="stream")
    seen = []
    while llm.has_unfinished_requests():
        for o in llm.step():
            seen.append(o.outputs[0].text)
    assert all(b.startswith(a) for a, b in zip(seen, seen[1:]))
    assert seen[-1] == free.text[:free.text.index(stop)]


def test_params_changed_after_construction_apply(llm):
    free = _greedy(llm, max_tokens=12)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    params.stop = [free.text[4:8]]
    c = llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == free.text[4:8]
    params.top_p = 2.0
    with pytest.raises(ValueError, match="top_p"):
        llm.add_request(PROMPT, params)


def test_cache_salt_separates_prefix_cache(llm):
    prompt = list(range(50, 90))  # 2 full blocks of 16
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    hits = lambda: llm.kv_stats()["prefix_hit_tokens"]  # noqa: E731
    llm.generate([{"prompt_token_ids": prompt, "cache_salt": "a"}], params, use_tqdm=False)
    before = hits()
    llm.generate([{"prompt_token_ids": prompt, "cache_salt": "b"}], params, use_tqdm=False)
    assert hits() == before  # another salt: nothing shared
    out = llm.generate([{"prompt_token_ids": prompt, "cache_salt": "a"}], params, use_tqdm=False)[0]
    assert hits() == before + 32 and out.num_cached_tokens == 32

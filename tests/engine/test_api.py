"""The user-facing behaviour of LLM / SamplingParams: stops, lengths, abort, logprobs, bad input, the step API,
and two engines in one process. References: the engine's own unconstrained run (stops must cut it exactly),
the tokenizer, and the model run densely (logprobs)."""

from __future__ import annotations

import pytest
import torch

from step3vl import LLM, SamplingParams


def _prompt(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def llm(tiny_ckpt) -> LLM:
    return LLM(tiny_ckpt, dtype="float32", device="cpu", kv_cache_memory="2MiB")


def _gen(llm: LLM, prompt, **kw):
    (o,) = llm.generate(prompt, SamplingParams(**kw), use_tqdm=False)
    return o


FREE = dict(temperature=1.0, seed=3, max_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def free_run(llm):
    """An unconstrained seeded run: the stop tests must cut exactly this output."""
    o = _gen(llm, _prompt(12), **FREE)
    c = o.outputs[0]
    assert len(c.token_ids) == 40 and c.finish_reason == "length" and c.stop_reason is None
    return c


def test_text_is_the_detokenized_output(llm, free_run):
    text = llm.get_tokenizer().decode(free_run.token_ids, skip_special_tokens=True)
    # A trailing incomplete UTF-8 character may be held back by the streaming detokenizer.
    assert free_run.text == text or (text.endswith("\ufffd") and text.startswith(free_run.text))
    assert len(free_run.text) > 10


def test_prompt_forms_agree(llm):
    """A string, its token ids, and {"prompt_token_ids": ids} / {"prompt": text} are the same request."""
    text = "The quick brown fox"
    ids = llm.get_tokenizer().encode(text)
    sp = SamplingParams(temperature=1.0, seed=2, max_tokens=6, ignore_eos=True)
    outs = llm.generate([text, ids, {"prompt_token_ids": ids}, {"prompt": text}], sp, use_tqdm=False)
    assert all(o.prompt_token_ids == ids for o in outs)
    assert outs[0].prompt == text and outs[1].prompt is None
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) == 1
    assert all(o.finished and o.metrics["time_to_first_token"] >= 0 for o in outs)


def test_max_tokens_length(llm):
    o = _gen(llm, _prompt(12), **{**FREE, "max_tokens": 5})
    (c,) = o.outputs
    assert len(c.token_ids) == 5 and c.finish_reason == "length"


def test_stop_string_cut_and_excluded(llm, free_run):
    tok = llm.get_tokenizer()
    full = free_run.text
    # A stop string from the second half of the text, two characters long, first occurring there.
    start = next(i for i in range(len(full) // 2, len(full) - 2)
                 if full.find(full[i:i + 2]) == i and "\ufffd" not in full[i:i + 2])
    stop = full[start:start + 2]
    o = _gen(llm, _prompt(12), **FREE, stop=["\x00never\x00", stop])
    (c,) = o.outputs
    assert c.finish_reason == "stop" and c.stop_reason == stop
    assert c.text == full[:start]
    # Generation ends at the token that completes the stop string (it stays in token_ids, as in vLLM).
    k = len(c.token_ids)
    assert c.token_ids == free_run.token_ids[:k]
    assert stop in tok.decode(c.token_ids, skip_special_tokens=True)
    assert stop not in tok.decode(c.token_ids[:-1], skip_special_tokens=True)


def test_stop_string_included_when_asked(llm, free_run):
    full = free_run.text
    start = next(i for i in range(len(full) // 2, len(full) - 2)
                 if full.find(full[i:i + 2]) == i and "\ufffd" not in full[i:i + 2])
    stop = full[start:start + 2]
    (c,) = _gen(llm, _prompt(12), **FREE, stop=stop, include_stop_str_in_output=True).outputs
    assert c.text == full[:start + 2] and c.stop_reason == stop


def test_stop_token_ids(llm, free_run):
    k = next(i for i in range(5, 40) if free_run.token_ids[i] not in free_run.token_ids[:i])
    t = free_run.token_ids[k]
    (c,) = _gen(llm, _prompt(12), **FREE, stop_token_ids=[t]).outputs
    assert c.finish_reason == "stop" and c.stop_reason == t
    assert c.token_ids == free_run.token_ids[:k + 1]


def test_eos_stops_unless_ignored(llm, free_run):
    eos = llm.get_tokenizer().eos_token_id

    def force_eos(out_ids, row):
        if len(out_ids) == 3:
            row = torch.full_like(row, -1e9)
            row[eos] = 0.0
        return row

    (c,) = _gen(llm, _prompt(12), **{**FREE, "ignore_eos": False}, logits_processors=[force_eos]).outputs
    assert c.finish_reason == "stop" and c.stop_reason is None
    assert c.token_ids == free_run.token_ids[:3] + [eos]
    (c,) = _gen(llm, _prompt(12), **FREE, logits_processors=[force_eos]).outputs
    assert c.finish_reason == "length" and len(c.token_ids) == 40 and c.token_ids[3] == eos


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_logprobs_match_dense_model(llm, tiny_dense, temperature):
    """The sampled token's logprob (and the top-k) = log_softmax of the model's raw logits (vLLM's default:
    before temperature / top-k / top-p), computed densely over prompt + output; cumulative = the sum."""
    prompt = _prompt(21, seed=4)
    (c,) = _gen(llm, prompt, temperature=temperature, top_k=40, seed=8, max_tokens=10, ignore_eos=True,
                logprobs=3).outputs
    ref = torch.log_softmax(tiny_dense.logits([prompt + c.token_ids[:-1]])[0][len(prompt) - 1:], dim=-1)
    assert len(c.logprobs) == len(c.token_ids) == 10
    total = 0.0
    for j, (t, lp) in enumerate(zip(c.token_ids, c.logprobs)):
        assert lp[t] == pytest.approx(float(ref[j, t]), abs=1e-4)
        vals, idx = ref[j].topk(3)
        for i, v in zip(idx.tolist(), vals.tolist()):
            assert lp[i] == pytest.approx(v, abs=1e-4)
        assert set(lp) == set(idx.tolist()) | {t}
        total += lp[t]
    assert c.cumulative_logprob == pytest.approx(total, abs=1e-5)
    assert c.cumulative_logprob == pytest.approx(float(ref[torch.arange(10), torch.tensor(c.token_ids)].sum()), abs=1e-3)


def test_no_logprobs_unless_asked(llm):
    (c,) = _gen(llm, _prompt(5), **{**FREE, "max_tokens": 3}).outputs
    assert c.logprobs is None and c.cumulative_logprob is None


@pytest.mark.parametrize("field,value", [
    ("n", 0), ("temperature", -0.5), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2), ("min_p", 1.5),
    ("min_p", -0.1), ("max_tokens", 0), ("seed", -1), ("logprobs", -1), ("stop", [""]), ("stop", [3]),
    ("stop_token_ids", [-1]), ("temperature", float("nan")), ("top_p", float("nan")),
])
def test_bad_sampling_params(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("kw,match", [
    (dict(block_size=24), "block_size"), (dict(block_size=0), "block_size"), (dict(kv_cache_memory=8192), "kv_cache_memory"),
    (dict(kv_cache_memory="lots"), "kv_cache_memory"), (dict(dtype="float64"), "dtype"),
    (dict(max_model_len=10**6), "max_model_len"),
])
def test_bad_llm_arguments(tiny_ckpt, kw, match):
    with pytest.raises(ValueError, match=match):
        LLM(tiny_ckpt, **{"device": "cpu", "dtype": "float32", "kv_cache_memory": "1MiB", **kw})


def test_logprobs_beyond_vocab_refused_at_add(tiny_ckpt):
    llm = LLM(tiny_ckpt, dtype="float32", device="cpu", kv_cache_memory="1MiB")
    ok = llm.add_request(_prompt(6), SamplingParams(temperature=1.0, seed=1, max_tokens=3, ignore_eos=True))
    try:
        with pytest.raises(ValueError, match="logprobs"):
            llm.add_request(_prompt(7), SamplingParams(max_tokens=3, logprobs=10_000))
    finally:
        done = {}
        while llm.has_unfinished_requests() and len(done) < 5:
            done.update({o.request_id: o for o in llm.step() if o.finished})
    assert len(done[ok].outputs[0].token_ids) == 3


def test_prompt_longer_than_max_model_len(tiny_ckpt):
    """Step API: the bad request is refused at once with a clear error; the others run to completion
    unaffected (the same tokens as without the bad one)."""
    llm = LLM(tiny_ckpt, dtype="float32", device="cpu", kv_cache_memory="2MiB", max_model_len=64)
    sp = SamplingParams(temperature=1.0, seed=1, max_tokens=8, ignore_eos=True)
    ref = LLM(tiny_ckpt, dtype="float32", device="cpu", kv_cache_memory="2MiB")
    want = [o.outputs[0].token_ids for o in ref.generate([_prompt(10, 1), _prompt(20, 2)], sp, use_tqdm=False)]
    a = llm.add_request(_prompt(10, 1), sp)
    with pytest.raises(ValueError, match="100 tokens.*max_model_len 64"):
        llm.add_request(_prompt(100, 3), sp)
    b = llm.add_request(_prompt(20, 2), sp)
    done = {}
    while llm.has_unfinished_requests():
        done.update({o.request_id: o.outputs[0].token_ids for o in llm.step() if o.finished})
    assert [done[a], done[b]] == want
    assert llm.kv_stats()["blocks_used"] == 0


def test_generate_with_a_too_long_prompt_leaves_nothing_behind(tiny_ckpt):
    llm = LLM(tiny_ckpt, dtype="float32", device="cpu", kv_cache_memory="2MiB", max_model_len=64)
    sp = SamplingParams(temperature=1.0, seed=1, max_tokens=8, ignore_eos=True)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([_prompt(10, 1), _prompt(100, 3)], sp, use_tqdm=False)
    assert not llm.has_unfinished_requests()


def test_generation_stops_at_max_model_len(tiny_ckpt):
    llm = LLM(tiny_ckpt, dtype="float32", device="cpu", kv_cache_memory="2MiB", max_model_len=40)
    (c,) = llm.generate(_prompt(30), SamplingParams(temperature=1.0, seed=1, max_tokens=100, ignore_eos=True),
                        use_tqdm=False)[0].outputs
    assert c.finish_reason == "length" and len(c.token_ids) == 10
    (c,) = llm.generate(_prompt(30), SamplingParams(temperature=1.0, seed=1, max_tokens=None, ignore_eos=True),
                        use_tqdm=False)[0].outputs
    assert c.finish_reason == "length" and len(c.token_ids) == 10
    (c,) = llm.generate(_prompt(39), SamplingParams(temperature=1.0, seed=1, max_tokens=5, ignore_eos=True),
                        use_tqdm=False)[0].outputs
    assert c.finish_reason == "length" and len(c.token_ids) == 1


def test_prompt_larger_than_pool_refused(tiny_ckpt):
    # max_model_len given larger than the pool: the pool itself is the limit named in the error.
    llm = LLM(tiny_ckpt, dtype="float32", device="cpu", kv_cache_memory=4 * 8192, max_model_len=1000)
    assert llm.kv_stats()["blocks_total"] == 4  # 64 tokens
    with pytest.raises(ValueError, match="KV pool"):
        llm.add_request(_prompt(80), SamplingParams(max_tokens=4))
    assert not llm.has_unfinished_requests()
    # A prompt that fits but cannot grow to max_tokens in the whole pool ends with 'length', no deadlock.
    (c,) = llm.generate(_prompt(50), SamplingParams(temperature=1.0, seed=1, max_tokens=40, ignore_eos=True),
                        use_tqdm=False)[0].outputs
    assert c.finish_reason == "length" and 50 + len(c.token_ids) <= 64 + 1
    assert len(c.token_ids) >= 64 - 50
    # Default max_model_len: capped at the pool, and the error says so.
    llm = LLM(tiny_ckpt, dtype="float32", device="cpu", kv_cache_memory=4 * 8192)
    with pytest.raises(ValueError, match="80 tokens"):
        llm.add_request(_prompt(80), SamplingParams(max_tokens=4))


def test_bad_prompts(llm):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.add_request([1, 2, 10**6])
    with pytest.raises(ValueError, match="empty"):
        llm.add_request([])
    with pytest.raises(ValueError, match="placeholder"):
        llm.add_request({"prompt": "no image here", "images": [torch.zeros(3, 8, 8)]})
    with pytest.raises(ValueError, match="2 sampling params for 3 prompts"):
        llm.generate([[1], [2], [3]], [SamplingParams(), SamplingParams()], use_tqdm=False)
    assert not llm.has_unfinished_requests()


def test_step_api_streams_and_aborts(llm):
    sp = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=30, ignore_eos=True)
    rid = llm.add_request(_prompt(40, seed=6), sp, request_id="mine")
    assert rid == "mine" and llm.has_unfinished_requests()
    with pytest.raises(ValueError, match="mine"):
        llm.add_request(_prompt(4), sp, request_id="mine")
    other = llm.add_request(_prompt(8, seed=7), SamplingParams(temperature=1.0, seed=9, max_tokens=4, ignore_eos=True))
    seen = {rid: 0, other: 0}
    for s in range(1, 6):
        for o in llm.step():
            assert all(len(c.token_ids) == s for c in o.outputs)
            seen[o.request_id] = s
            if o.request_id == other:
                assert o.finished == (s == 4)
                assert [c.finish_reason for c in o.outputs] == (["length"] if s == 4 else [None])
    assert seen == {rid: 5, other: 4}
    assert llm.kv_stats()["blocks_used"] > 0
    out = llm.abort(rid)
    assert out.finished and out.request_id == rid
    assert [c.finish_reason for c in out.outputs] == ["abort"] * 3
    assert all(len(c.token_ids) == 5 for c in out.outputs)
    assert not llm.has_unfinished_requests()
    assert llm.kv_stats()["blocks_used"] == 0
    assert llm.step() == []
    assert llm.abort(rid) is None  # unknown / already gone


def test_abort_before_first_step_and_of_deduplicated_request(llm):
    p = _prompt(33, seed=8)
    sp = SamplingParams(temperature=1.0, seed=1, max_tokens=6, ignore_eos=True)
    (ref,) = llm.generate(p, sp, use_tqdm=False)
    a = llm.add_request(p, sp)
    b = llm.add_request(p, sp)  # identical prompt: would be forked from a
    c = llm.add_request(_prompt(5, seed=1), sp)
    out = llm.abort(a)  # the leader goes before it ever ran: b must still be served
    assert [x.finish_reason for x in out.outputs] == ["abort"]
    assert llm.abort(c).outputs[0].token_ids == []
    done = {}
    while llm.has_unfinished_requests():
        done.update({o.request_id: o for o in llm.step() if o.finished})
    assert set(done) == {b}
    assert done[b].outputs[0].token_ids == ref.outputs[0].token_ids
    assert llm.kv_stats()["blocks_used"] == 0


def test_abort_reports_every_sample(tiny_ckpt):
    llm = LLM(tiny_ckpt, dtype="float32", device="cpu", kv_cache_memory="1MiB")
    sp = SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=6, ignore_eos=True)
    p = _prompt(20, seed=9)
    a = llm.add_request(p, sp)
    b = llm.add_request(p, sp)  # deduplicated: forked from a later
    for rid in (b, a):
        out = llm.abort(rid)
        assert [c.index for c in out.outputs] == [0, 1, 2]
        assert [c.finish_reason for c in out.outputs] == ["abort"] * 3


def test_two_llms_in_one_process_do_not_interfere(tiny_ckpt, qwen3_ckpt):
    sp = SamplingParams(n=2, temperature=1.0, seed=4, max_tokens=12, ignore_eos=True)
    pa, pb = _prompt(25, 1), _prompt(19, 2)
    want_a = LLM(tiny_ckpt, dtype="float32", device="cpu", kv_cache_memory="1MiB").generate(pa, sp, use_tqdm=False)
    want_b = LLM(qwen3_ckpt[0], dtype="float32", device="cpu", kv_cache_memory="1MiB").generate(pb, sp, use_tqdm=False)
    a = LLM(tiny_ckpt, dtype="float32", device="cpu", kv_cache_memory="1MiB")
    b = LLM(qwen3_ckpt[0], dtype="float32", device="cpu", kv_cache_memory="1MiB", block_size=32)
    ra, rb = a.add_request(pa, sp), b.add_request(pb, sp)
    assert ra == rb  # each engine numbers its own requests
    got = {}
    while a.has_unfinished_requests() or b.has_unfinished_requests():
        for name, eng in (("a", a), ("b", b)):
            for o in eng.step():
                if o.finished:
                    got[name] = [c.token_ids for c in o.outputs]
    assert got["a"] == [c.token_ids for c in want_a[0].outputs]
    assert got["b"] == [c.token_ids for c in want_b[0].outputs]
    assert a.kv_stats()["prefill_tokens_computed"] == 25 and b.kv_stats()["prefill_tokens_computed"] == 19


def test_reset_stats_starts_counters_afresh(tiny_ckpt):
    llm = LLM(tiny_ckpt, dtype="float32", device="cpu", kv_cache_memory=256 * 4096)
    prompt = list(range(5, 40))
    llm.generate([prompt], SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert llm.kv_stats()["prefill_tokens_computed"] == len(prompt)
    llm.reset_stats()
    stats = llm.kv_stats()
    assert stats["prefill_tokens_computed"] == 0 and stats["peak_blocks_used"] == 0
    assert stats["prefix_hit_tokens"] == 0
    llm.generate([prompt], SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    stats = llm.kv_stats()
    assert stats["prefix_hit_tokens"] == 32  # the two full 16-token blocks of the same prompt, cached
    assert stats["peak_blocks_used"] > 0


def test_reset_prefix_cache_drops_unpinned_cached_blocks(tiny_ckpt):
    from step3vl import LLM, SamplingParams

    llm = LLM(tiny_ckpt, kv_cache_memory="8MiB", block_size=16)
    prompt = list(range(3, 3 + 80))
    pinned = list(range(200, 240))
    llm.generate([prompt, pinned], SamplingParams(max_tokens=2), use_tqdm=False)
    llm.pin_prefix(pinned)
    assert llm.kv_stats()["blocks_cached"] == 5  # the 80-token prompt's full blocks (pinned ones are not evictable)
    assert llm.reset_prefix_cache() == 5 and llm.kv_stats()["blocks_cached"] == 0
    llm.reset_stats()
    llm.generate([prompt, pinned], SamplingParams(max_tokens=2), use_tqdm=False)
    assert llm.kv_stats()["prefix_hit_tokens"] == 32  # the pinned 40-token prompt's two full blocks, nothing else

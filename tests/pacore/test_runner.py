"""The round state machine on a real (tiny, random-weight) engine, driven by scripted trajectories."""

import math
import random
from pathlib import Path

import pytest

from step3vl_pacore import PaCoRe, PaCoReConfig, Problem
from step3vl_pacore.template import synthesis_messages

ASSET = Path(__file__).resolve().parents[2] / "step3vl" / "assets" / "demo_shapes.png"


def distinct_answer(c: str) -> str:
    # one length per letter, so sorting by length alone fixes the order of distinct messages
    return f" The answer is {c * (ord(c) - 64)}."


def official_order(messages, seed=42):
    out = sorted(messages, key=len)
    random.Random(seed).shuffle(out)
    return out


def test_round_messages_appear_in_the_next_round_prompt(make_llm, script, hook, tokenizer):
    llm = make_llm()
    sc = script(answer=distinct_answer)
    q = "What is 2+2?"
    cfg = PaCoReConfig(rounds=[4, 3], max_tokens=24, message_max_tokens=16, record_prompts=True,
                       sampling_hook=hook({"*": sc}))
    (res,) = PaCoRe(llm, cfg).run([Problem.from_question(q, id="p")])
    assert res.error is None, res.error
    assert [s.k for s in res.rounds] == [4, 3, 1]
    for r in range(3):
        responses = res.round_responses[r]
        letters = [resp["reasoning_content"][0] for resp in responses]
        assert all(resp["reasoning_content"] == c + " thinking" for resp, c in zip(responses, letters))
        assert all(resp["content"] == distinct_answer(c) for resp, c in zip(responses, letters))
        generated = sum(len(sc.tokens(tokenizer.token_to_id(c))) for c in letters)
        assert res.tokens_per_round[r] == res.rounds[r].generated_tokens == generated
        if r == 2:
            break
        expected = official_order([distinct_answer(c) for c in letters])
        assert [resp["content"] for resp in responses] == expected
        text, _ = llm.processor.apply_chat_template(synthesis_messages([{"role": "user", "content": q}], expected))
        nxt = res.rounds[r + 1]
        assert nxt.prompt == text
        assert nxt.prompt_tokens == len(tokenizer.encode(text))
        assert all(m in nxt.prompt for m in expected)
    c = res.round_responses[2][0]["reasoning_content"][0]
    assert res.final_response == distinct_answer(c)
    assert res.final_reasoning_content == c + " thinking"
    assert res.effective_ttc == sum(res.tokens_per_round)
    assert res.prompt_tokens == sum(s.prompt_tokens for s in res.rounds)


def test_kv_of_a_round_is_released_before_the_next(make_llm, script, hook):
    llm = make_llm()
    sc = script(think_at=20)
    used_at_start = {}

    def probe(r):
        def proc(out, logits):
            if not out:
                used_at_start.setdefault(r, llm.kv_stats()["blocks_used"])
            return sc(out, logits)
        return proc

    cfg = PaCoReConfig(rounds=[6], max_tokens=40, sampling_hook=hook({"*": {0: probe(0), 1: probe(1)}}))
    (res,) = PaCoRe(llm, cfg).run([Problem.from_question("Name a colour.", id="p")])
    assert res.error is None, res.error
    bs = llm.kv_stats()["block_size"]
    # at the first token of each round only that round's prompt blocks are held: the 6 samples of round 1
    # (prompt + ~30 tokens each) are all gone by the time the synthesis round starts
    assert used_at_start[0] == math.ceil(res.rounds[0].prompt_tokens / bs)
    assert used_at_start[1] == math.ceil(res.rounds[1].prompt_tokens / bs)
    assert llm.kv_stats()["peak_blocks_used"] > used_at_start[1]
    assert llm.kv_stats()["blocks_used"] == 0


def test_problems_interleave(make_llm, script, hook, tokenizer):
    llm = make_llm()
    slow = script(think_at=120)  # A: a long first round
    fast = script()
    slow_len = len(slow.tokens(tokenizer.token_to_id("A")))
    state = {"a_len": 0}

    def a_round0(out, logits):
        state["a_len"] = max(state["a_len"], len(out))
        return slow(out, logits)

    def b_final(out, logits):
        state.setdefault("a_len_when_b_final_starts", state["a_len"])
        return fast(out, logits)

    cfg = PaCoReConfig(rounds=[2], max_tokens=160,
                       sampling_hook=hook({"A": {0: a_round0, "*": fast}, "B": {1: b_final, "*": fast}}))
    results = list(PaCoRe(llm, cfg).run_iter([Problem.from_question("slow one", id="A"),
                                              Problem.from_question("fast one", id="B")]))
    assert [r.request_id for r in results] == ["B", "A"]
    assert all(r.error is None for r in results), [r.error for r in results]
    # B went through round 1 and into its final round while A's first round was still generating
    assert 0 < state["a_len_when_b_final_starts"] < slow_len - 1
    a = results[1]
    assert a.rounds[0].generated_tokens >= 2 * (slow_len - 10)


def test_bad_inputs_fail_alone(make_llm, script, hook, tmp_path):
    llm = make_llm(max_model_len=512)
    not_png = tmp_path / "not_an_image.png"
    not_png.write_text("this is not an image")
    problems = [
        Problem.from_question("What is 2+2?", id="good"),
        Problem("no_user", [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]),
        Problem("bad_image", [{"role": "user", "content": [{"type": "image", "image": str(not_png)},
                                                           {"type": "text", "text": "q"}]}]),
        Problem("missing_image", [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": str(tmp_path / "nope.png")}}, {"type": "text", "text": "q"}]}]),
        Problem("empty", []),
        Problem("blank", [{"role": "user", "content": "   "}]),
        Problem("too_long", [{"role": "user", "content": "word " * 600}]),
        {"id": "not_a_list", "messages": "hello"},
        Problem.from_question("What is 3+3?", id="good2"),
    ]
    cfg = PaCoReConfig(rounds=[2], max_tokens=16, sampling_hook=hook({"*": script()}))
    results = {r.request_id: r for r in PaCoRe(llm, cfg).run(problems)}
    expected = {"no_user": "no user turn", "bad_image": "unreadable image", "missing_image": "not found",
                "empty": "empty problem", "blank": "empty problem", "too_long": "does not fit max_model_len",
                "not_a_list": "non-empty list"}
    for pid, msg in expected.items():
        assert results[pid].error is not None and msg in results[pid].error, (pid, results[pid].error)
        assert results[pid].final_response == ""
    for pid in ("good", "good2"):
        assert results[pid].error is None and results[pid].final_response.startswith(" The answer is")
    assert llm.kv_stats()["blocks_used"] == 0


def test_a_round_without_any_message_is_an_error_and_keep_passes_text_on(make_llm, script, hook):
    unclosed = script(close=False)
    cfg = dict(rounds=[3], max_tokens=16, record_prompts=True)
    (res,) = PaCoRe(make_llm(), PaCoReConfig(**cfg, sampling_hook=hook({"*": unclosed}))).run(
        [Problem.from_question("q?", id="p")])
    assert res.error is not None and "round 1: none of its 3 trajectories yielded a message" in res.error
    assert "never closed" in res.error
    assert [r["dropped"] for r in res.round_responses[0]] == ["unclosed"] * 3
    assert len(res.rounds) == 1 and res.final_response == ""

    (kept,) = PaCoRe(make_llm(), PaCoReConfig(**cfg, unclosed_policy="keep", sampling_hook=hook({"*": unclosed}))).run(
        [Problem.from_question("q?", id="p")])
    assert kept.error is None
    texts = [r["content"] for r in kept.round_responses[0]]
    assert all(t[0] in "ABCD" and t.endswith(" thinking") for t in texts)
    assert all(t in kept.rounds[1].prompt for t in texts)

    final_unclosed = hook({"*": {0: script(), 1: unclosed}})
    (res,) = PaCoRe(make_llm(), PaCoReConfig(**cfg, sampling_hook=final_unclosed)).run([Problem.from_question("q?", id="p")])
    assert res.error is not None and res.error.startswith("final round: the trajectory gave no answer")
    assert res.final_response == "" and res.final_reasoning_content.endswith(" thinking")


def test_image_stays_in_the_synthesis_turn_and_its_blocks_are_reused(make_llm, script, hook):
    llm = make_llm()
    cfg = PaCoReConfig(rounds=[2], max_tokens=16, record_prompts=True, sampling_hook=hook({"*": script()}))
    (res,) = PaCoRe(llm, cfg).run([Problem.from_question("How many shapes?", image=str(ASSET), id="img")])
    assert res.error is None, res.error
    from step3vl.processor import IMAGE_PLACEHOLDER, load_image
    img = load_image(str(ASSET))
    ids = [llm.processor.process(s.prompt, [img]).input_ids for s in res.rounds]
    assert all(s.prompt.count(IMAGE_PLACEHOLDER) == 1 for s in res.rounds)
    assert res.rounds[1].prompt.index(IMAGE_PLACEHOLDER) < res.rounds[1].prompt.index("You are given a problem")
    assert [s.prompt_tokens for s in res.rounds[:2]] == [len(i) for i in ids[:2]]
    common = next(j for j, (a, b) in enumerate(zip(ids[0], ids[1])) if a != b)
    bs = llm.kv_stats()["block_size"]
    assert common > 100  # the image tokens come first
    assert res.rounds[1].prefix_hit_tokens == (common // bs) * bs


def test_seeded_runs_repeat_and_concurrency_limit(make_llm):
    cfg = dict(rounds=[3], max_tokens=12, unclosed_policy="keep", message_max_tokens=6)
    problems = [Problem.from_question(f"question {i}", id=f"q{i}") for i in range(3)]
    a = PaCoRe(make_llm(), PaCoReConfig(**cfg)).run(problems)
    b = PaCoRe(make_llm(), PaCoReConfig(**cfg, max_concurrent_problems=1)).run(problems)
    assert [r.request_id for r in a] == ["q0", "q1", "q2"]
    assert [r.final_response for r in a] == [r.final_response for r in b]
    assert [r.round_responses for r in a] == [r.round_responses for r in b]
    assert len({r.final_response for r in a}) == 3  # distinct problems, distinct seeds
    c = PaCoRe(make_llm(), PaCoReConfig(**{**cfg, "seed": 7})).run(problems)
    assert [r.final_response for r in c] != [r.final_response for r in a]


def test_config_presets_and_validation():
    assert PaCoReConfig.preset("low").schedule == [4, 1]
    assert PaCoReConfig.preset("medium").schedule == [16, 1]
    assert PaCoReConfig.preset("high").schedule == [32, 4, 1]
    assert PaCoReConfig.preset("high").trajectories_per_problem == 37
    with pytest.raises(ValueError, match="rounds"):
        PaCoReConfig(rounds=[])
    with pytest.raises(ValueError, match="unclosed_policy"):
        PaCoReConfig(unclosed_policy="maybe")
    with pytest.raises(ValueError, match="preset"):
        PaCoReConfig.preset("extreme")


def test_duplicate_ids_are_rejected(make_llm):
    with pytest.raises(ValueError, match="duplicate"):
        PaCoRe(make_llm(), PaCoReConfig(rounds=[1])).run([Problem.from_question("a", id="x"),
                                                          Problem.from_question("b", id="x")])


def test_a_synthesis_prompt_over_the_context_fails_its_problem(make_llm, script, hook):
    llm = make_llm(max_model_len=110)
    long_answer = script(answer=lambda c: " The answer is " + " ".join([c] * 12) + ".")
    cfg = PaCoReConfig(rounds=[3], max_tokens=40, sampling_hook=hook({"*": long_answer}))
    (res,) = PaCoRe(llm, cfg).run([Problem.from_question("q?", id="p")])
    assert res.error is not None and res.error.startswith("round 2: ValueError")
    assert "does not fit max_model_len 110" in res.error
    assert len(res.rounds) == 1 and len(res.round_responses) == 1 and res.rounds[0].messages == 3
    assert res.effective_ttc == res.rounds[0].generated_tokens > 0

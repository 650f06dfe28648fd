"""PaCoRe synthesis episodes: the rendered prompt, the draw, the filter, determinism and errors."""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest

from step3vl_pacore.episodes import (EpisodeConfig, SynthesisEpisode, make_episode, make_episodes,
                             pool_from_result)
from step3vl_pacore.problem import Problem
from step3vl_pacore.result import PaCoReResult
from step3vl_pacore.template import SYNTHESIS_TEMPLATE

ROOT = Path(__file__).resolve().parents[2]


def official(original_prompt: str, refs: list[str]) -> str:
    """The official template rendered by hand (jinja2 defaults: block lines keep their newline, the
    template's final newline is dropped)."""
    head = ("You are given a problem and a list of reference responses. Your job is to analyze these references "
            "and provide your own response.\n\nOriginal Problem:\n" + original_prompt + "\n\nReference Responses:\n")
    body = "".join(f"\nReference {i}:\n{r}\n" for i, r in enumerate(refs, 1))
    return head + body + ("\n\nNow, based on the original problem and reference responses above, please provide "
                          "your own comprehensive solution.")


def test_hand_rendering_agrees_with_the_official_template():
    refs = ["first", "two\nlines", "{{ not a tag }}"]
    assert jinja2.Template(SYNTHESIS_TEMPLATE).render(original_prompt="P?", ref_responses=refs) == official("P?", refs)


def answer(i: int, value) -> str:
    return f"<think>attempt {i}</think>So the answer is \\boxed{{{value}}}."


def pool_with(n_correct: int, n_wrong: int, gold=7) -> tuple[list[str], set[str]]:
    correct = [answer(i, gold) for i in range(n_correct)]
    wrong = [answer(n_correct + i, gold + 1 + i % 3) for i in range(n_wrong)]
    return correct + wrong, set(correct)


def text_problem(pid: str, gold=7) -> Problem:
    return Problem(id=pid, messages=[{"role": "user", "content": f"What is problem {pid}?"}], ground_truth=gold)


# -- one episode --------------------------------------------------------------------------------------

def test_episode_renders_the_synthesis_turn_and_keeps_images():
    image = {"type": "image", "image": "diagram.png"}
    messages = [{"role": "system", "content": "Be careful."},
                {"role": "user", "content": "earlier question"},
                {"role": "assistant", "content": "earlier reply"},
                {"role": "user", "content": [image, {"type": "text", "text": "Find x."},
                                             {"type": "text", "text": "Give a number."}]}]
    problem = Problem(id="geo", messages=messages, ground_truth="3")
    before = copy.deepcopy(messages)
    pool, _ = pool_with(5, 20, gold=3)
    ep = make_episode(problem, pool, EpisodeConfig(min_refs=4, max_refs=6), random.Random(0))
    assert isinstance(ep, SynthesisEpisode) and ep.problem_id == "geo" and ep.ground_truth == "3"
    assert ep.messages[:3] == before[:3]
    turn = ep.messages[3]
    assert turn["role"] == "user"
    assert turn["content"] == [image, {"type": "text", "text": official("Find x.\nGive a number.", ep.ref_responses)}]
    assert messages == before  # the problem is not modified


def test_draw_sizes_and_subsets():
    cfg = EpisodeConfig(min_refs=16, max_refs=24, max_correct_fraction=1.0)
    pool, _ = pool_with(10, 30)
    sizes = []
    for s in range(300):
        ep = make_episode(text_problem("p"), pool, cfg, random.Random(s))
        assert cfg.min_refs <= len(ep.ref_responses) <= cfg.max_refs
        assert len(set(ep.ref_responses)) == len(ep.ref_responses)  # without replacement
        assert set(ep.ref_responses) <= set(pool)
        sizes.append(len(ep.ref_responses))
    assert set(sizes) == set(range(16, 25))  # uniform over the whole range (P(miss one) ~ 1e-14)


def test_small_pool_is_used_whole_and_shuffled():
    pool, _ = pool_with(2, 8)
    orders = set()
    for s in range(20):
        ep = make_episode(text_problem("p"), pool, EpisodeConfig(max_correct_fraction=1.0), random.Random(s))
        assert sorted(ep.ref_responses) == sorted(pool)
        orders.add(tuple(ep.ref_responses))
    assert len(orders) > 1


@pytest.mark.parametrize("threshold", [0.0, 0.5, 0.75, 1.0])
def test_filtered_exactly_when_the_fraction_correct_is_above_the_threshold(threshold):
    cfg = EpisodeConfig(min_refs=8, max_refs=8, max_correct_fraction=threshold)
    for n_correct in range(9):
        pool, _ = pool_with(n_correct, 8 - n_correct)  # the pool is the whole draw
        ep = make_episode(text_problem("p"), pool, cfg, random.Random(n_correct))
        assert (ep is None) == (n_correct / 8 > threshold), n_correct
        if ep is not None:
            assert ep.ref_correct_fraction == n_correct / 8


def test_fraction_counts_the_drawn_messages_only():
    pool, correct = pool_with(12, 28)
    cfg = EpisodeConfig(min_refs=5, max_refs=15, max_correct_fraction=1.0)
    fractions = set()
    for s in range(50):
        ep = make_episode(text_problem("p"), pool, cfg, random.Random(s))
        expected = sum(r in correct for r in ep.ref_responses) / len(ep.ref_responses)
        assert ep.ref_correct_fraction == expected
        fractions.add(expected)
    assert len(fractions) > 3


def test_reward_fn_is_used_with_a_half_cut():
    pool = ["a", "b", "c", "d"]
    rewards = {"a": 1.0, "b": 0.51, "c": 0.5, "d": 0.0}
    seen = []

    def reward(text, gold):
        seen.append((text, gold))
        return rewards[text]
    problem = Problem(id="p", messages=[{"role": "user", "content": "q"}], ground_truth="g")
    ep = make_episode(problem, pool, EpisodeConfig(min_refs=4, max_refs=4), random.Random(0), reward)
    assert ep.ref_correct_fraction == 0.5
    assert sorted(seen) == [(r, "g") for r in pool]
    assert make_episode(problem, pool, EpisodeConfig(4, 4, max_correct_fraction=0.49), random.Random(0), reward) is None


# -- many episodes ------------------------------------------------------------------------------------

def _problems_and_pools(n=12):
    problems, pools = [], {}
    for k in range(n):
        pid = f"prob-{k}"
        problems.append(text_problem(pid))
        pools[pid], _ = pool_with(k % 5, 30)
    return problems, pools


def _key(eps):
    return {e.problem_id: (e.ref_responses, e.messages, e.ref_correct_fraction) for e in eps}


def test_make_episodes_is_deterministic_and_order_independent():
    problems, pools = _problems_and_pools()
    cfg = EpisodeConfig(min_refs=4, max_refs=10, max_correct_fraction=0.1, seed=3)
    a = make_episodes(problems, pools, cfg)
    b = make_episodes(problems, pools, cfg)
    c = make_episodes(list(reversed(problems)), pools, cfg)
    d = make_episodes(problems[5:6], pools, cfg)  # alone
    assert [e.problem_id for e in a] == [p.id for p in problems if p.id in _key(a)]  # problem order kept
    assert _key(a) == _key(b) == _key(c)
    assert all(_key(a)[e.problem_id] == _key(d)[e.problem_id] for e in d)
    assert 0 < len(a) < len(problems)  # some filtered, some kept
    assert all(e.ref_correct_fraction <= 0.1 for e in a)
    other = make_episodes(problems, pools, EpisodeConfig(min_refs=4, max_refs=10, max_correct_fraction=0.1, seed=4))
    assert _key(other) != _key(a)


def test_make_episodes_accepts_official_records():
    records = [{"id": "r1", "messages": [{"role": "user", "content": "q1"}], "ground_truth": 7}]
    pool, _ = pool_with(0, 20)
    (ep,) = make_episodes(records, {"r1": pool}, EpisodeConfig(min_refs=3, max_refs=3))
    assert ep.messages[0]["content"] == official("q1", ep.ref_responses)


def test_seeds_do_not_depend_on_the_hash_seed(tmp_path):
    code = ("import json; from step3vl_pacore.episodes import *; from step3vl_pacore.problem import Problem\n"
            "msgs = [{'role': 'user', 'content': 'q'}]\n"
            "ps = [Problem(id=f'p{k}', messages=msgs, ground_truth=1) for k in range(4)]\n"
            "pools = {p.id: [f'r{i}' for i in range(40)] for p in ps}\n"
            "eps = make_episodes(ps, pools, EpisodeConfig(seed=5))\n"
            "print(json.dumps([e.ref_responses for e in eps]))")
    outs = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed,
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        outs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    assert outs[0] == outs[1] and len(outs[0]) == 4


# -- pools from results -------------------------------------------------------------------------------

def test_pool_from_result_keeps_passed_on_messages_of_every_round():
    rounds = [[{"content": "m1", "reasoning_content": "r", "finish_reason": "stop", "num_tokens": 3},
               {"content": "", "reasoning_content": "", "finish_reason": "stop", "num_tokens": 2, "dropped": "empty"},
               {"content": "", "reasoning_content": "long", "finish_reason": "length", "num_tokens": 9,
                "dropped": "unclosed"},
               {"content": "m2", "reasoning_content": "", "finish_reason": "stop", "num_tokens": 4, "truncated": True}],
              [{"content": "m3", "reasoning_content": "", "finish_reason": "stop", "num_tokens": 1},
               {"content": "   ", "reasoning_content": "", "finish_reason": "stop", "num_tokens": 1}],
              [{"content": "final", "reasoning_content": "why", "finish_reason": "stop", "num_tokens": 5}]]
    res = PaCoReResult(request_id="q1", final_response="final", round_responses=rounds)
    assert pool_from_result(res) == ["m1", "m2", "m3", "final"]
    assert pool_from_result(res.to_dict()) == ["m1", "m2", "m3", "final"]
    assert pool_from_result({"request_id": "q2", "round_responses": [["a", "b"], ["c"]]}) == ["a", "b", "c"]


@pytest.mark.parametrize("record", [
    {"request_id": "bad1"},
    {"request_id": "bad1", "round_responses": [{"content": "x"}]},
    {"request_id": "bad1", "round_responses": [[3]]},
    {"request_id": "bad1", "round_responses": [[{"content": 3}]]},
])
def test_pool_from_result_rejects_bad_records(record):
    with pytest.raises(ValueError, match="bad1"):
        pool_from_result(record)


# -- errors -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, field", [
    ({"min_refs": 0}, "min_refs"), ({"min_refs": 2.0}, "min_refs"), ({"min_refs": 5, "max_refs": 4}, "max_refs"),
    ({"max_correct_fraction": 1.5}, "max_correct_fraction"), ({"max_correct_fraction": -0.1}, "max_correct_fraction"),
    ({"max_correct_fraction": "0.5"}, "max_correct_fraction"), ({"seed": None}, "seed"),
    ({"max_refs": True}, "max_refs"),
])
def test_bad_config(kwargs, field):
    with pytest.raises(ValueError, match=field):
        EpisodeConfig(**kwargs)


def test_bad_problems():
    cfg, rng = EpisodeConfig(), random.Random(0)
    with pytest.raises(ValueError, match="'empty-pool'.*empty"):
        make_episode(text_problem("empty-pool"), [], cfg, rng)
    with pytest.raises(ValueError, match="'no-gt'.*ground_truth"):
        make_episode(Problem(id="no-gt", messages=[{"role": "user", "content": "q"}]), ["a"], cfg, rng)
    with pytest.raises(ValueError, match="'no-user'.*no user turn"):
        make_episode(Problem(id="no-user", messages=[{"role": "system", "content": "s"}], ground_truth=1),
                     ["a"], cfg, rng)
    problems, pools = _problems_and_pools(2)
    with pytest.raises(ValueError, match="'prob-1'.*no pool"):
        make_episodes(problems, {"prob-0": pools["prob-0"]}, cfg)
    with pytest.raises(ValueError, match="duplicate.*'prob-0'"):
        make_episodes([problems[0], problems[0]], pools, cfg)

"""Compaction of a round's samples: edge cases, policies and the message order."""

import random
from dataclasses import dataclass

import pytest

from step3vl_pacore.compaction import compact_round, order_trajectories, passed_on


@dataclass
class Sample:  # the fields of a CompletionOutput that compaction reads
    index: int
    token_ids: list
    finish_reason: str = "stop"
    stop_reason: object = None


@pytest.fixture
def ids(tokenizer):
    T, E = tokenizer.think_end_id, tokenizer.eos_token_id

    def enc(s):
        return tokenizer.encode(s)
    return enc, T, E


def run(tokenizer, samples, bound=None, policy="drop"):
    return compact_round(samples, tokenizer, [tokenizer.think_end_id], bound, policy)


def test_closed_message_is_text_after_the_marker_without_eos(tokenizer, ids):
    enc, T, E = ids
    s = Sample(0, enc("<think>let me see") + [T] + enc(" The answer is 4.") + [E])
    (t,) = run(tokenizer, [s])
    assert t.message == " The answer is 4." and t.reasoning == "let me see"
    assert t.closed and not t.truncated and t.dropped is None and t.num_tokens == len(s.token_ids)


def test_several_markers_use_the_last(tokenizer, ids):
    enc, T, E = ids
    s = Sample(0, enc("a") + [T] + enc(" b") + [T] + enc(" c") + [E])
    (t,) = run(tokenizer, [s])
    assert t.message == " c"
    # the reasoning runs up to the last marker (the first one is decoded as the tokenizer decodes it)
    assert t.reasoning == tokenizer.decode(enc("a") + [T] + enc(" b"), skip_special_tokens=True)
    assert t.reasoning.startswith("a") and t.reasoning.endswith(" b")


def test_no_marker_drop_and_keep(tokenizer, ids):
    enc, T, E = ids
    s = Sample(0, enc(" never closes its reasoning"), finish_reason="length")
    (t,) = run(tokenizer, [s])
    assert t.dropped == "unclosed" and t.message == "" and not t.closed
    assert t.reasoning == " never closes its reasoning"
    (k,) = run(tokenizer, [s], policy="keep")
    assert k.dropped is None and k.message == " never closes its reasoning" and k.reasoning == ""
    bound = 2
    (kb,) = run(tokenizer, [s], bound=bound, policy="keep")
    assert kb.message == tokenizer.decode(s.token_ids[:bound]) and kb.truncated


def test_empty_conclusion_is_dropped(tokenizer, ids):
    enc, T, E = ids
    at_end = Sample(0, enc("x") + [T], finish_reason="length")
    then_eos = Sample(1, enc("x") + [T, E])
    out = run(tokenizer, [at_end, then_eos])
    assert [t.dropped for t in out] == ["empty", "empty"]
    assert all(t.closed and t.message == "" for t in out)


def test_over_long_message_is_bounded(tokenizer, ids):
    enc, T, E = ids
    tail = enc(" one two three four five six seven")
    s = Sample(0, enc("r") + [T] + tail + [E])
    (t,) = run(tokenizer, [s], bound=3)
    assert t.truncated and t.message == tokenizer.decode(tail[:3])
    (u,) = run(tokenizer, [s], bound=len(tail))
    assert not u.truncated and u.message == tokenizer.decode(tail)


def test_stop_string_keeps_tokens_and_abort_is_dropped(tokenizer, ids):
    enc, T, E = ids
    stop_str = Sample(0, enc("r") + [T] + enc(" end"), stop_reason=" end")
    aborted = Sample(1, enc("r") + [T] + enc(" ok"), finish_reason="abort")
    empty = Sample(2, [], finish_reason="length")
    a, b, c = run(tokenizer, [stop_str, aborted, empty])
    assert a.message == " end" and a.dropped is None
    assert b.dropped == "aborted" and b.message == ""
    assert c.dropped == "unclosed" and c.num_tokens == 0


def test_batched_rows_match_one_by_one(tokenizer, ids):
    enc, T, E = ids
    samples = [Sample(i, enc("w" * i) + [T] + enc(" m" * (i + 1)) + ([E] if i % 2 else []),
                      finish_reason="stop" if i % 2 else "length") for i in range(5)]
    together = run(tokenizer, samples, bound=3)
    alone = [run(tokenizer, [s], bound=3)[0] for s in samples]
    assert [(t.message, t.truncated, t.reasoning) for t in together] == [(t.message, t.truncated, t.reasoning) for t in alone]


def _official_order(messages, seed):
    # The official client: sort all contents by length, shuffle with random.Random(seed), drop the empty ones.
    out = sorted(messages, key=len)
    random.Random(seed).shuffle(out)
    return [m for m in out if m]


def test_order_is_reproducible_and_independent_of_arrival(tokenizer, ids):
    enc, T, E = ids
    texts = [" a", " bb", " ccc", " dddd", " eeeee", " ffffff", " ggggggg"]
    samples = [Sample(i, enc("r") + [T] + enc(m) + [E]) for i, m in enumerate(texts)]
    samples.append(Sample(7, enc("no close"), finish_reason="length"))  # dropped: takes part as an empty
    trajs = run(tokenizer, samples)
    first = passed_on(order_trajectories(trajs, 42))
    assert first == passed_on(order_trajectories(trajs, 42))
    assert first == passed_on(order_trajectories(list(reversed(trajs)), 42))  # arrival order does not matter
    assert first == _official_order(texts + [""], 42)
    assert first != passed_on(order_trajectories(trajs, 7))
    assert first != sorted(texts, key=len)


@pytest.mark.gpu
def test_cuda_kernel_path_matches_the_cpu_reference(tokenizer, ids):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (the compaction kernel)")
    enc, T, E = ids
    rng = random.Random(0)
    samples = []
    for i in range(24):
        body = [rng.randrange(0, 400) for _ in range(rng.randrange(0, 60))]
        for _ in range(rng.randrange(0, 3)):
            body.insert(rng.randrange(0, len(body) + 1), T)
        samples.append(Sample(i, body + ([E] if i % 3 == 0 else []), finish_reason="stop" if i % 3 == 0 else "length"))
    for policy in ("drop", "keep"):
        for bound in (None, 1, 7):
            cpu = compact_round(samples, tokenizer, [T], bound, policy, "cpu")
            gpu = compact_round(samples, tokenizer, [T], bound, policy, "cuda")
            assert cpu == gpu

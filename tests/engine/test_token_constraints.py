"""allowed_token_ids, logit_bias and min_tokens: the batched rules against their plain-Python definition, and
their effect on whole generations (greedy against the dense reference with the rule applied by hand)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from step3vl import LLM, SamplingParams
from step3vl.engine.sequence import Request, Sequence
from step3vl.engine.token_constraints import apply_constraints, apply_constraints_ref, bad_words_token_ids

VOCAB = 30
EOS = {3, 7}
ids = st.integers(0, VOCAB - 1)


@given(st.lists(st.tuples(st.one_of(st.none(), st.lists(ids, min_size=1, max_size=6)),
                          st.one_of(st.none(), st.dictionaries(ids, st.floats(-100, 100), max_size=4)),
                          st.integers(0, 4), st.integers(0, 6), st.lists(ids, max_size=3), st.booleans()),
                min_size=1, max_size=5),
       st.integers(0, 2**31 - 1))
@settings(max_examples=80, deadline=None)
def test_batched_rules_equal_the_definition(rows, seed):
    logits = torch.randn(len(rows), VOCAB, generator=torch.Generator().manual_seed(seed))
    params = [SamplingParams(allowed_token_ids=a, logit_bias=b, min_tokens=m, stop_token_ids=s, ignore_eos=ie)
              for a, b, m, _, s, ie in rows]
    seqs = [Sequence(0, Request("r", None, [1, 2], sp, seed=0, arrival=0), 0, [1, 2] + [5] * n)
            for sp, (_, _, _, n, _, _) in zip(params, rows)]
    got = apply_constraints(logits, seqs, EOS)
    for i, (a, b, m, n, s, ie) in enumerate(rows):
        want = torch.tensor(apply_constraints_ref(logits[i].tolist(), n, a, b, m, s, EOS, ie))
        torch.testing.assert_close(got[i], want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("kw, field", [
    (dict(min_tokens=5, max_tokens=4), "min_tokens"), (dict(logit_bias={3: 101.0}), "logit_bias"),
    (dict(logit_bias={-1: 1.0}), "logit_bias"), (dict(allowed_token_ids=[]), "allowed_token_ids")])
def test_bad_values_name_the_field(kw, field):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        SamplingParams(**kw)


@pytest.fixture(scope="module")
def llm(qwen3_ckpt):
    return LLM(qwen3_ckpt[0], dtype="float32", device="cpu", kv_cache_memory="4MiB")


PROMPT = [5, 17, 99, 4, 250, 31]


def test_greedy_with_rules_equals_the_dense_reference(llm, qwen3_dense):
    allowed, bias = [10, 20, 30, 40, 50, 60], {20: 3.0, 60: -2.0}
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, allowed_token_ids=allowed,
                            logit_bias=bias)
    got = llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0].token_ids
    ids = list(PROMPT)
    for _ in range(12):
        row = qwen3_dense.logits([ids])[0][-1].tolist()
        row = apply_constraints_ref(row, len(ids) - len(PROMPT), allowed, bias, 0, [], set(), True)
        ids.append(max(range(len(row)), key=row.__getitem__))
    assert got == ids[len(PROMPT):]
    assert set(got) <= set(allowed)


def test_min_tokens_holds_back_stop_tokens(llm):
    plain = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)[0].outputs[0]
    stop = plain.token_ids[2]  # the greedy path would stop at its 3rd token
    early = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop]),
                         use_tqdm=False)[0].outputs[0]
    assert early.finish_reason == "stop" and len(early.token_ids) <= 3
    held = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop], min_tokens=6),
                        use_tqdm=False)[0].outputs[0]
    assert len(held.token_ids) >= 6 and stop not in held.token_ids[:6]


def test_out_of_vocabulary_ids_are_refused_by_the_engine(llm):
    with pytest.raises(ValueError, match="logit_bias: token id 100000 is outside the vocabulary"):
        llm.generate([PROMPT], SamplingParams(logit_bias={100000: 1.0}), use_tqdm=False)
    assert not llm.has_unfinished_requests()


# -- bad_words ------------------------------------------------------------------------------------------------------

words = st.lists(st.lists(ids, min_size=1, max_size=3), max_size=4)


@given(st.lists(st.tuples(words, st.lists(ids, max_size=6)), min_size=1, max_size=4), st.integers(0, 2**31 - 1))
@settings(max_examples=80, deadline=None)
def test_bad_words_equal_the_definition(rows, seed):
    logits = torch.randn(len(rows), VOCAB, generator=torch.Generator().manual_seed(seed))
    seqs = []
    for bad, out in rows:
        req = Request("r", None, [1, 2], SamplingParams(bad_words=["w"]), seed=0, arrival=0)
        req.bad_words_ids = bad
        seqs.append(Sequence(0, req, 0, [1, 2] + out))
    got = apply_constraints(logits, seqs, EOS)
    for i, (bad, out) in enumerate(rows):
        want = torch.tensor(apply_constraints_ref(logits[i].tolist(), len(out), None, None, 0, [], EOS, False,
                                                  bad_words_ids=bad, output_ids=out))
        torch.testing.assert_close(got[i], want)


def test_bad_words_tokenized_with_and_without_a_leading_space():
    vocab = {"cat": [1], " cat": [2], "dog house": [3, 4], " dog house": [5, 4], "x y": [6, 7], " x y": [6, 7]}
    assert bad_words_token_ids(["cat", " dog house", "x y"], vocab.__getitem__) == [[1], [2], [3, 4], [5, 4], [6, 7]]
    with pytest.raises(ValueError, match="SamplingParams.bad_words"):
        SamplingParams(bad_words=["ok", " "])
    with pytest.raises(ValueError, match="SamplingParams.bad_words"):
        SamplingParams(bad_words="word")


def test_greedy_with_bad_words_equals_the_dense_reference(llm, qwen3_dense):
    """Ban the greedy path's own 2nd token outright and its 4th-5th pair as a two-token word: the engine's output
    is the dense greedy loop with those masks, and never contains either."""
    tok = llm.get_tokenizer()
    free = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].token_ids
    texts = [tok.decode([free[1]]), tok.decode(free[3:5])]
    bad = bad_words_token_ids(texts, tok.encode)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, bad_words=texts)
    got = llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0].token_ids
    ids = list(PROMPT)
    for _ in range(12):
        row = qwen3_dense.logits([ids])[0][-1].tolist()
        out = ids[len(PROMPT):]
        row = apply_constraints_ref(row, len(out), None, None, 0, [], set(), True, bad_words_ids=bad, output_ids=out)
        ids.append(max(range(len(row)), key=row.__getitem__))
    assert got == ids[len(PROMPT):] and got != free
    for word in bad:
        assert not any(got[i:i + len(word)] == word for i in range(len(got)))

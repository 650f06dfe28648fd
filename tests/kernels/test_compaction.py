"""Batched message compaction: the reference (and the CPU dispatch) on hand-computed cases, and against a
plain per-row Python loop on random batches."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from step3vl_kernels.compaction import compact_messages
from step3vl_kernels.compaction_ref import compact_messages_ref

PAD = 0
IMPLS = pytest.mark.parametrize("impl", [compact_messages, compact_messages_ref], ids=["dispatch", "ref"])


def _batch(rows: list[list[int]], width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    L = width or max(1, max(len(r) for r in rows))
    tokens = torch.full((len(rows), L), PAD, dtype=torch.int32)
    for k, r in enumerate(rows):
        tokens[k, : len(r)] = torch.tensor(r, dtype=torch.int32)
    return tokens, torch.tensor([len(r) for r in rows], dtype=torch.int32)


def _messages(res) -> list[list[int]]:
    return [res.message(k).tolist() for k in range(len(res))]


def _check(res, messages, closed, truncated):
    assert res.tokens.dtype == torch.int32 and res.offsets.dtype == torch.int32
    assert _messages(res) == messages
    assert res.offsets.tolist() == [sum(len(m) for m in messages[:k]) for k in range(len(messages) + 1)]
    assert res.closed.tolist() == closed
    assert res.truncated.tolist() == truncated


@IMPLS
def test_no_marker(impl):
    tokens, lengths = _batch([[1, 2, 3]])
    _check(impl(tokens, lengths, [9], 10, keep_unclosed=False), [[]], [False], [False])
    _check(impl(tokens, lengths, [9], 10, keep_unclosed=True), [[1, 2, 3]], [False], [False])


@IMPLS
def test_several_markers_take_the_last(impl):
    tokens, lengths = _batch([[1, 9, 2, 9, 3, 4]])
    _check(impl(tokens, lengths, [9], 10), [[3, 4]], [True], [False])


@IMPLS
def test_marker_at_the_very_end_gives_an_empty_closed_message(impl):
    tokens, lengths = _batch([[1, 2, 9]])
    for keep in (False, True):
        _check(impl(tokens, lengths, [9], 10, keep_unclosed=keep), [[]], [True], [False])


@IMPLS
def test_over_long_conclusion_is_truncated(impl):
    tokens, lengths = _batch([[9, 1, 2, 3, 4, 5], [4, 9, 6, 7, 8]])
    _check(impl(tokens, lengths, [9], 3), [[1, 2, 3], [6, 7, 8]], [True, True], [True, False])


@IMPLS
def test_unclosed_kept_is_bounded_too(impl):
    tokens, lengths = _batch([[1, 2, 3, 4]])
    _check(impl(tokens, lengths, [9], 2, keep_unclosed=True), [[1, 2]], [False], [True])
    _check(impl(tokens, lengths, [9], 2, keep_unclosed=False), [[]], [False], [False])


@IMPLS
def test_multi_token_marker(impl):
    # (7, 2) and a trailing lone 7 are not the span; the last full span starts at 6
    tokens, lengths = _batch([[7, 8, 1, 7, 2, 8, 7, 8, 5, 6, 7]])
    _check(impl(tokens, lengths, [7, 8], 10), [[5, 6, 7]], [True], [False])
    # overlapping occurrences: the last start of (3, 3) in 3 3 3 1 is 1
    tokens, lengths = _batch([[3, 3, 3, 1]])
    _check(impl(tokens, lengths, [3, 3], 10), [[1]], [True], [False])


@IMPLS
def test_only_the_first_length_tokens_count(impl):
    # a marker in the padding is ignored, and so is a span cut by the length
    tokens, _ = _batch([[1, 9, 2, 9, 9]])
    _check(impl(tokens, torch.tensor([3], dtype=torch.int32), [9], 10), [[2]], [True], [False])
    tokens, _ = _batch([[1, 7, 8]])
    _check(impl(tokens, torch.tensor([2], dtype=torch.int32), [7, 8], 10, keep_unclosed=True), [[1, 7]],
           [False], [False])


@IMPLS
def test_k1_l1_and_empty_rows(impl):
    _check(impl(*_batch([[9]]), [9], 5), [[]], [True], [False])
    _check(impl(*_batch([[5]]), [9], 5, keep_unclosed=True), [[5]], [False], [False])
    _check(impl(*_batch([[]], width=1), [9], 5, keep_unclosed=True), [[]], [False], [False])
    _check(impl(*_batch([[7, 8]]), [7, 8, 9], 5, keep_unclosed=True), [[7, 8]], [False], [False])  # m > L


@IMPLS
def test_batch_packs_back_to_back(impl):
    rows = [[1, 9, 2, 3], [4, 5], [9], [6, 9, 7, 8, 9, 1, 2, 3, 4], [9, 9, 5]]
    res = impl(*_batch(rows), [9], 3, keep_unclosed=True)
    _check(res, [[2, 3], [4, 5], [], [1, 2, 3], [5]], [True, False, True, True, True],
           [False, False, False, True, False])
    assert res.tokens.tolist() == [2, 3, 4, 5, 1, 2, 3, 5]
    res = impl(*_batch(rows), [9], 0, keep_unclosed=True)
    _check(res, [[]] * 5, [True, False, True, True, True], [True, True, False, True, True])


@IMPLS
def test_rejects_bad_input(impl):
    tokens, lengths = _batch([[1, 2, 3]])
    with pytest.raises(ValueError, match="marker"):
        impl(tokens, lengths, [], 5)
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, L=3\]"):
        impl(tokens, torch.tensor([4], dtype=torch.int32), [9], 5)
    with pytest.raises(ValueError, match="lengths must be"):
        impl(tokens, torch.tensor([3, 3], dtype=torch.int32), [9], 5)
    with pytest.raises(ValueError, match="max_tokens"):
        impl(tokens, lengths, [9], -1)
    with pytest.raises(ValueError, match=r"\[K, L\]"):
        impl(tokens[0], lengths, [9], 5)
    with pytest.raises(TypeError, match="integers"):
        impl(tokens.float(), lengths, [9], 5)


def _loop_reference(rows, lengths, marker, max_tokens, keep_unclosed):
    """Straight from the definition, one row at a time."""
    out = []
    m = len(marker)
    for row, n in zip(rows, lengths):
        row = row[:n]
        hits = [p for p in range(n - m + 1) if row[p : p + m] == marker]
        if hits:
            msg, closed = row[hits[-1] + m :], True
        else:
            msg, closed = (row if keep_unclosed else []), False
        out.append((msg[:max_tokens], closed, len(msg) > max_tokens))
    return out


@settings(max_examples=60, deadline=None)
@given(data=st.data(), K=st.integers(1, 8), L=st.integers(1, 24), m=st.integers(1, 3),
       max_tokens=st.integers(0, 30), keep_unclosed=st.booleans())
def test_matches_a_per_row_loop(data, K, L, m, max_tokens, keep_unclosed):
    vocab = st.integers(1, 3)  # tiny vocabulary: markers occur often, also overlapping
    rows = [data.draw(st.lists(vocab, min_size=L, max_size=L)) for _ in range(K)]
    lengths = [data.draw(st.integers(0, L)) for _ in range(K)]
    marker = data.draw(st.lists(vocab, min_size=m, max_size=m))
    res = compact_messages_ref(torch.tensor(rows, dtype=torch.int32), torch.tensor(lengths, dtype=torch.int32),
                               marker, max_tokens, keep_unclosed)
    want = _loop_reference(rows, lengths, marker, max_tokens, keep_unclosed)
    assert _messages(res) == [w[0] for w in want]
    assert res.closed.tolist() == [w[1] for w in want]
    assert res.truncated.tolist() == [w[2] for w in want]

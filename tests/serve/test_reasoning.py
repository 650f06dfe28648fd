"""split_reasoning: a hand-checked table, and (hypothesis) a stream's deltas add up to the final split."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from step3vl.serve.reasoning import ReasoningDeltas, split_reasoning


@pytest.mark.parametrize("text, finished, want", [
    ("<think>plan</think>answer", True, ("plan", "answer")),
    ("plan</think>answer", True, ("plan", "answer")),
    ("a</think>b</think>c", True, ("a", "b</think>c")),  # the first close ends the reasoning
    ("never closed", True, ("never closed", "")),
    ("half </thi", False, ("half ", "")),  # could still become </think>
    ("half </thi", True, ("half </thi", "")),
    ("<thi", False, ("", "")),  # could still be the opening tag
    ("<thi", True, ("<thi", "")),
    ("", True, ("", "")),
])
def test_split_table(text, finished, want):
    assert split_reasoning(text, finished) == want


pieces = st.lists(st.sampled_from(["<think>", "</think>", "<", "</", "</th", "ink>", "think", ">", "a", "b c",
                                   "\n", "é"]), max_size=14)


@given(pieces, st.lists(st.integers(1, 5), min_size=1, max_size=30))
@settings(max_examples=300, deadline=None)
def test_stream_deltas_add_up_to_the_final_split(parts, steps):
    text = "".join(parts)
    d, reasoning, content, pos = ReasoningDeltas(), "", "", 0
    for s in steps:  # grow the text a few characters at a time, like tokens
        pos = min(len(text), pos + s)
        r, c = d.delta(text[:pos], finished=False)
        reasoning, content = reasoning + r, content + c
    r, c = d.delta(text, finished=True)
    assert (reasoning + r, content + c) == split_reasoning(text, finished=True)

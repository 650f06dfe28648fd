"""Splitting a thinking model's output into `reasoning_content` and `content` (vLLM's reasoning parser).

STEP3-VL reasons first and closes the reasoning with `</think>`; the answer follows. The split is taken at the
*first* `</think>` so that a stream can send each piece once: everything before it is reasoning (a leading
`<think>` dropped), everything after it is content. A text that never closes its reasoning is all reasoning.

`split_reasoning(text, finished=False)` is prefix-stable: while the text grows, the reasoning and the content
it returns only ever grow. That needs holding back a tail that could still turn into `</think>` (or a start that
could still be `<think>`) until the next token decides it, or until the text is finished.
"""

from __future__ import annotations

THINK_START, THINK_END = "<think>", "</think>"


def _held_tail(text: str, marker: str) -> int:
    """Length of the longest proper suffix of `text` that is a prefix of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


def split_reasoning(text: str, finished: bool = False) -> tuple[str, str]:
    """(reasoning, content) of the text generated so far."""
    if not finished and len(text) < len(THINK_START) and THINK_START.startswith(text):
        return "", ""  # could still be the opening tag
    body = text[len(THINK_START):] if text.startswith(THINK_START) else text
    end = body.find(THINK_END)
    if end >= 0:
        return body[:end], body[end + len(THINK_END):]
    hold = 0 if finished else _held_tail(body, THINK_END)
    return body[:len(body) - hold], ""


class ReasoningDeltas:
    """Per-choice stream state: each call returns the (reasoning, content) added since the last call."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.sent_reasoning = 0
        self.sent_content = 0

    def delta(self, text: str, finished: bool) -> tuple[str, str]:
        reasoning, content = split_reasoning(text, finished) if self.enabled else ("", text)
        out = reasoning[self.sent_reasoning:], content[self.sent_content:]
        self.sent_reasoning, self.sent_content = len(reasoning), len(content)
        return out

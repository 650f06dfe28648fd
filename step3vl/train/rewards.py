"""Outcome rewards for RL: rule-checked final answers.

A reward function is any callable `(text, gold) -> float` in [0, 1], where `text` is the policy's whole
trajectory (reasoning, `</think>`, final message) and `gold` the reference answer. `math_reward` is the
one for math: the answer is read from the final message only (a box inside the reasoning does not
count), normalized conservatively, and compared exactly: as strings, or as rational numbers with
`fractions.Fraction` (no float tolerance, so 1/3 and 0.33 differ).

Deliberately our own small, dependency-free checker rather than `math-verify` (which pins an ANTLR
LaTeX parser and uses signal-based timeouts): it handles the answer forms of competition math
(integers, decimals, fractions, short lists, units) and leaves symbolic equivalence (sqrt forms,
expanded vs factored) to exact string equality after normalization.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from decimal import Decimal
from fractions import Fraction
from typing import Any, Callable

RewardFn = Callable[[str, Any], float]  # (trajectory text, gold answer) -> reward in [0, 1]

THINK_END = "</think>"


def final_message(text: str) -> str:
    """The text after the last `</think>`, stripped; the whole text when there is none."""
    return text.rsplit(THINK_END, 1)[-1].strip()


# -- extraction ---------------------------------------------------------------------------------------

_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_IS = re.compile(r"answer(?:\*\*)?\s*(?:is\s*:?|:)\s*(.+)", re.IGNORECASE)
# A sentence ends at ". " / "; " / ", because ..." (not inside "3.5" or a list "1, 2").
_SENTENCE_END = re.compile(r"\.\s|;|,\s+(?:since|because|as|which|so|and|but)\b", re.IGNORECASE)


def _matching_braces(s: str) -> dict[int, int]:
    """Index of each `{` -> index just past its `}`, in one pass (a cut-off text costs O(n), not O(n^2));
    unbalanced `{` are absent. `\\{` `\\}` (any backslash pair) are text."""
    close, stack, i = {}, [], 0
    while i < len(s):
        c = s[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            stack.append(i)
        elif c == "}" and stack:
            close[stack.pop()] = i + 1
        i += 1
    return close


def _last_box(s: str) -> str | None:
    """Content of the last balanced outermost `\\boxed{...}` / `\\fbox{...}` in s (a cut-off box is skipped,
    boxes inside it still count)."""
    close = _matching_braces(s)
    found, after = None, 0
    for m in _BOX.finditer(s):
        end = close.get(m.end() - 1)
        if end is None or m.start() < after:  # unbalanced, or nested in the box already taken
            continue
        found, after = s[m.end():end - 1], end
    return found


def _answer_phrase(line: str) -> str | None:
    """X of the innermost "answer is X" / "Answer: X" of a line, cut at the end of its sentence."""
    found = None
    while (m := _ANSWER_IS.search(line)) is not None:
        found = line = m.group(1)  # "Final Answer: The final answer is 5" -> "5"
    if found is None:
        return None
    found = _SENTENCE_END.split(found, 1)[0]
    prev = None
    while prev != found:  # markdown bold and a closing period, in any order: "**5**." / "5.**"
        prev, found = found, found.strip().strip("*").rstrip(".").strip()
    return found or None


def extract_answer(text: str) -> str | None:
    """The answer of a trajectory, read from its final message: the last `\\boxed{...}` (or `\\fbox{...}`),
    else the last "answer is X" / "Answer: X" (the innermost one of its line, up to the end of the sentence),
    else None."""
    msg = final_message(text)
    box = _last_box(msg)
    if box is not None:
        return box.strip()
    found = None
    for line in msg.splitlines():
        found = _answer_phrase(line) or found
    return found


# -- normalization ------------------------------------------------------------------------------------

# Spacing commands and wrappers that never change a value (`\left(` but not `\leftarrow`).
_SPACING = re.compile(r"\\(?:left|right|displaystyle)(?![a-zA-Z])|\\[!,;: ]|~|\\?\$")
_FRAC_ALIASES = re.compile(r"\\[dtc]frac(?![a-zA-Z])")
# `\frac ab`, `\frac1{2}`, `\frac{1}2`: TeX takes one token per argument when there is no brace group.
_FRAC_ARG = r"(\{[^{}]*\}|\\[a-zA-Z]+|[^\s{}\\])"
_FRAC_SHORT = re.compile(r"\\frac\s*" + _FRAC_ARG + r"\s*" + _FRAC_ARG)
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°")
_TEXT = re.compile(r"\\(?:text|textbf|textrm|mbox|mathrm)\s*\{([^{}]*)\}")
_TRAILING_TEXT = re.compile(r"(.*?)\s*\\(?:text|mbox|mathrm)\s*\{[^{}]*\}")
_ASSIGNMENT = re.compile(r"[a-zA-Z]\s*=\s*([^=]+)")  # x = 3 (one variable, one `=`)
_CHOICE = re.compile(r"\(([A-Za-z])\)")  # (B) -> B


def _arg(a: str) -> str:
    return a if a.startswith("{") else "{" + a + "}"


def _unwrap(s: str, left: str, right: str) -> str:
    """s without one pair of `left`/`right` around the whole of it (only if that pair matches itself)."""
    if not (s.startswith(left) and s.endswith(right) and len(s) >= len(left) + len(right)):
        return s
    if left == "{":
        return s[1:-1] if _matching_braces(s).get(0) == len(s) else s
    return s[len(left):-len(right)]


def normalize_answer(s: str) -> str:
    """A canonical string for an answer; conservative: it only removes what never changes the value.

    - math delimiters `$`, `\\( \\)`, `\\[ \\]`, an outer `\\boxed{}` and outer braces;
    - `\\left`/`\\right`, `\\displaystyle` and spacing (`\\!`, `\\,`, `\\;`, `\\:`, `\\ `, `~`, whitespace);
    - `\\dfrac`/`\\tfrac`/`\\cfrac` -> `\\frac`, and `\\frac ab` -> `\\frac{a}{b}`;
    - degrees (`^\\circ`, `^{\\circ}`, `°`) and the percent sign (`\\%`, `%`): units, dropped, so "50\\%"
      equals "50" but never 0.5;
    - a trailing `\\text{...}` after a number (a unit: "5 \\text{cm}" -> "5"); other `\\text{X}` -> X;
    - a leading single-variable assignment ("x = 3" -> "3") when it is the only `=`;
    - LaTeX thousands separators `{,}`; a trailing period; "(B)" -> "B".
    Case is kept (variables are case-sensitive).
    """
    s = str(s).strip()
    s = _unwrap(s, r"\(", r"\)")
    s = _unwrap(s, r"\[", r"\]")
    s = _SPACING.sub(" ", s).strip()
    if (m := _BOX.match(s)) is not None and _matching_braces(s).get(m.end() - 1) == len(s):
        s = s[m.end():-1].strip()
    s = _FRAC_ALIASES.sub(r"\\frac", s)
    s = _FRAC_SHORT.sub(lambda m: r"\frac" + _arg(m.group(1)) + _arg(m.group(2)), s)
    s = _DEGREES.sub("", s)
    s = s.replace(r"\%", "").replace("%", "").replace("{,}", "")
    s = s.strip().rstrip(".").strip()
    if (m := _TRAILING_TEXT.fullmatch(s)) and m.group(1) and _to_number(_squash(m.group(1))) is not None:
        s = m.group(1)
    s = _TEXT.sub(lambda m: m.group(1), s)
    if (m := _ASSIGNMENT.fullmatch(s.strip())) is not None:
        s = m.group(1)
    s = _squash(s).rstrip(".")
    while (inner := _unwrap(s, "{", "}")) != s:
        s = inner
    if (m := _CHOICE.fullmatch(s)) is not None:
        s = m.group(1)
    return s


def _squash(s: str) -> str:
    """Whitespace removed, but kept where it ends a control word (`\\pi r` must not become `\\pir`)."""
    s = re.sub(r"(\\[a-zA-Z]+)\s+(?=[a-zA-Z])", r"\1{}", s.strip())
    return re.sub(r"\s+", "", s)


# -- comparison ---------------------------------------------------------------------------------------

_DECIMAL = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"  # no exponents: "1e999999999" would be a huge integer
_NUMBER = re.compile(_DECIMAL)
_SLASH = re.compile(f"({_DECIMAL})/({_DECIMAL})")
_FRAC = re.compile(r"([+-]?)\\frac\{(" + _DECIMAL + r")\}\{(" + _DECIMAL + r")\}")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


def _to_number(s: str) -> Fraction | None:
    """The exact rational value of a normalized answer: an integer, a decimal, `a/b` or `\\frac{a}{b}`."""
    try:
        if _NUMBER.fullmatch(s):
            return Fraction(s)
        if (m := _SLASH.fullmatch(s)) is not None:
            return Fraction(m.group(1)) / Fraction(m.group(2))
        if (m := _FRAC.fullmatch(s)) is not None:
            v = Fraction(m.group(2)) / Fraction(m.group(3))
            return -v if m.group(1) == "-" else v
    except (ZeroDivisionError, ValueError):  # ValueError: more digits than int() accepts
        return None
    return None


def _gold_text(gold: Any) -> str:
    if isinstance(gold, bool) or gold is None:
        raise ValueError(f"gold answer must be a string or a number, got {gold!r}")
    if isinstance(gold, float):
        if not math.isfinite(gold):
            raise ValueError(f"gold answer must be finite, got {gold!r}")
        # shortest round-trip decimal, positional: 0.1 -> "0.1" (read back exactly as 1/10), 1e-07 -> "0.0000001"
        return format(Decimal(repr(gold)), "f")
    if isinstance(gold, (list, tuple)):
        return ",".join(_gold_text(g) for g in gold)
    return str(gold)


def _split_top(s: str) -> list[str]:
    """s split at the commas outside any brackets (so intervals and tuples stay whole)."""
    items, depth, cur = [], 0, []
    for c in s:
        if c in "([{":  # `\{1, 2\}` counts as bracketed too: a set is compared whole
            depth += 1
        elif c in ")]}":
            depth -= 1
        if c == "," and depth == 0:
            items.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    items.append("".join(cur))
    return items


def _key(item: str):
    """An item's identity for multiset comparison: its value when it is a number, else its text."""
    n = _to_number(item)
    return ("num", n) if n is not None else ("str", item)


def answers_match(pred: str | None, gold: Any) -> bool:
    """Whether a predicted answer equals the gold one.

    Equal when the normalized strings are equal, or both are numbers of the same exact rational value
    (integers, decimals, `a/b`, `\\frac{a}{b}`: 0.5 == 1/2 == \\frac{1}{2}, but 1/3 != 0.33). A percent
    sign is a unit, dropped on both sides: "50\\%" == 50, never 0.5.

    When the gold is a comma list at top level ("1, 2"; a list or tuple gold is one too), the prediction
    must be a list with the same items in any order (multisets, each item compared as above). A
    bracketed tuple, interval or set ("(1, 2)", "[1, 2)", "\\{1, 2\\}") is compared whole, as a string.
    A number with thousands separators ("1,000") equals the plain number, on either side.

    `gold` may be a str, int or float (a float is read as its shortest decimal, exactly); an empty gold
    is a ValueError. `pred` None (no answer found) never matches.
    """
    g = normalize_answer(_gold_text(gold))
    if not g:
        raise ValueError(f"gold answer {gold!r} is empty after normalization")
    if pred is None:
        return False
    p = normalize_answer(pred)
    if p == g:
        return True
    if _THOUSANDS.fullmatch(g) or _THOUSANDS.fullmatch(p):  # 1,000 == 1000; a gold "1,234" is read both ways
        gn, pn = _to_number(g.replace(",", "")), _to_number(p.replace(",", ""))
        if gn is not None and gn == pn:
            return True
    g_items = _split_top(g)
    if len(g_items) > 1:
        p_items = _split_top(p)
        return Counter(map(_key, p_items)) == Counter(map(_key, g_items))
    gn = _to_number(g)
    return gn is not None and _to_number(p) == gn


def math_reward(text: str, gold: Any) -> float:
    """1.0 when the answer in the final message matches `gold`, else 0.0."""
    return 1.0 if answers_match(extract_answer(text), gold) else 0.0

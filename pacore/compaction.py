"""From a round's finished samples to the messages the next round sees.

A trajectory's message is the text after its last `</think>`, bounded to `max_tokens` tokens; all K samples
of a round are compacted in one batched call (the CUDA kernel for CUDA tensors, its PyTorch reference on
the CPU). Policies (PaCoReConfig.unclosed_policy):
- closed, non-empty message: passed on;
- closed with an empty message: dropped ("empty"), as the official client drops empty contents;
- unclosed (no `</think>`): "drop" passes nothing, "keep" passes its whole text (bounded);
- aborted: always dropped.
Order (the official client's): all K sorted by message length in characters (stable), then shuffled with
random.Random(seed); dropped ones are filtered out after the shuffle, so they take part in it as empties.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from step3vl_kernels.compaction import compact_messages

THINK_START = "<think>"


@dataclass
class Trajectory:
    index: int  # sample index within its round
    message: str  # what passes on ("" when dropped)
    reasoning: str  # text before the last `</think>` (the whole text when unclosed and dropped)
    finish_reason: str | None
    num_tokens: int  # tokens generated
    closed: bool
    truncated: bool
    dropped: str | None = None  # None, "unclosed", "empty" or "aborted"

    def record(self, with_reasoning: bool = True) -> dict:
        """The official round_responses entry, plus why it was dropped and how it ended."""
        d = {"content": self.message, "reasoning_content": self.reasoning if with_reasoning else "",
             "finish_reason": self.finish_reason, "num_tokens": self.num_tokens}
        if self.truncated:
            d["truncated"] = True
        if self.dropped:
            d["dropped"] = self.dropped
        return d


def output_lengths(samples: list) -> list[int]:
    """Generated tokens that count as text: the eos / stop token that ended a sample is not part of it
    (a stop *string* leaves stop_reason a str and its tokens stay)."""
    out = []
    for s in samples:
        n = len(s.token_ids)
        if s.finish_reason == "stop" and n and not isinstance(getattr(s, "stop_reason", None), str):
            n -= 1
        out.append(n)
    return out


def compact_round(samples: list, tokenizer, marker: list[int], max_tokens: int | None, unclosed_policy: str = "drop",
                  device: torch.device | str = "cpu") -> list[Trajectory]:
    """samples: CompletionOutput-like (index, token_ids, finish_reason, stop_reason) -> one Trajectory each,
    in the same order. tokenizer: anything with decode(ids, skip_special_tokens)."""
    if not samples:
        return []
    keep_unclosed = unclosed_policy == "keep"
    lengths = output_lengths(samples)
    L = max(max(lengths), 1)
    rows = torch.zeros(len(samples), L, dtype=torch.int32)
    for k, (s, n) in enumerate(zip(samples, lengths)):
        if n:
            rows[k, :n] = torch.tensor(s.token_ids[:n], dtype=torch.int32)
    dev = torch.device(device)
    bound = L if max_tokens is None else max_tokens
    packed = compact_messages(rows.to(dev), torch.tensor(lengths, dtype=torch.int32, device=dev),
                              torch.tensor(marker, dtype=torch.int32, device=dev), bound, keep_unclosed)
    tokens, offsets = packed.tokens.cpu().tolist(), packed.offsets.cpu().tolist()
    closed, truncated = packed.closed.cpu().tolist(), packed.truncated.cpu().tolist()
    out = []
    for k, (s, n) in enumerate(zip(samples, lengths)):
        ids = s.token_ids[:n]
        msg = tokenizer.decode(tokens[offsets[k]:offsets[k + 1]], skip_special_tokens=True)
        if closed[k]:
            cut = last_marker(ids, marker)
            reasoning = _strip_think(tokenizer.decode(ids[:cut], skip_special_tokens=True))
        else:
            reasoning = "" if keep_unclosed else _strip_think(tokenizer.decode(ids, skip_special_tokens=True))
        t = Trajectory(s.index, msg, reasoning, s.finish_reason, len(s.token_ids), bool(closed[k]), bool(truncated[k]))
        if s.finish_reason == "abort":
            t.dropped = "aborted"
        elif not closed[k] and not keep_unclosed:
            t.dropped = "unclosed"
        elif not msg:
            t.dropped = "empty"
        if t.dropped:
            t.message, t.truncated = "", False
        out.append(t)
    return out


def last_marker(ids: list[int], marker: list[int]) -> int:
    """Start of the last occurrence of `marker` in `ids`, or -1."""
    m = len(marker)
    for j in range(len(ids) - m, -1, -1):
        if ids[j] == marker[0] and ids[j:j + m] == marker:
            return j
    return -1


def _strip_think(text: str) -> str:
    # Chat templates of reasoning models may open the turn with <think>; a reasoning parser drops it.
    return text[len(THINK_START):] if text.startswith(THINK_START) else text


def order_trajectories(trajectories: list[Trajectory], seed: int) -> list[Trajectory]:
    """Sorted by message length (stable), then shuffled with random.Random(seed)."""
    ordered = sorted(trajectories, key=lambda t: len(t.message))
    random.Random(seed).shuffle(ordered)
    return ordered


def passed_on(ordered: list[Trajectory]) -> list[str]:
    return [t.message for t in ordered if not t.dropped]

"""Reference batched message compaction (PaCoRe): cut each trajectory's conclusion and pack all of them.

Message k = the tokens after the LAST occurrence of the marker span (the ids of `</think>`) within the first
lengths[k] tokens of row k, cut to its first `max_tokens` tokens (truncated[k] says it was cut). Without a marker
the row is unclosed (closed[k] = False) and its message is empty, or, with keep_unclosed, the whole row (bounded
the same way). A marker at the very end gives an empty message that is closed. Messages are packed back to back:
message k is tokens[offsets[k]:offsets[k+1]]. Also the engine's CPU path.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class CompactedMessages:
    tokens: torch.Tensor  # int32 [total]
    offsets: torch.Tensor  # int32 [K+1], offsets[0] = 0
    closed: torch.Tensor  # bool [K]
    truncated: torch.Tensor  # bool [K]

    def __len__(self) -> int:
        return self.closed.numel()

    def message(self, k: int) -> torch.Tensor:
        return self.tokens[int(self.offsets[k]) : int(self.offsets[k + 1])]


def check_compaction_args(tokens: torch.Tensor, lengths: torch.Tensor, marker: torch.Tensor | Sequence[int],
                          max_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shapes, dtypes and bounds; returns (tokens, lengths, marker) as int32 on tokens' device."""
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [K, L], got shape {tuple(tokens.shape)}")
    K, L = tokens.shape
    if lengths.shape != (K,):
        raise ValueError(f"lengths must be [K={K}], got shape {tuple(lengths.shape)}")
    marker = marker if isinstance(marker, torch.Tensor) else torch.tensor(list(marker), dtype=torch.int32)
    if marker.dim() != 1 or marker.numel() == 0:
        raise ValueError(f"marker must be a non-empty 1-D list of token ids, got shape {tuple(marker.shape)}")
    for name, t in (("tokens", tokens), ("lengths", lengths), ("marker", marker)):
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"{name} must hold integers, got {t.dtype}")
    if lengths.device != tokens.device:
        raise ValueError(f"lengths is on {lengths.device}, tokens on {tokens.device}")
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
    if K * L >= 2**31:
        raise ValueError(f"tokens has {K}x{L} elements; the int32 offsets allow fewer than 2**31")
    if K and bool(((lengths < 0) | (lengths > L)).any()):
        raise ValueError(f"lengths must lie in [0, L={L}], got range [{int(lengths.min())}, {int(lengths.max())}]")
    return tokens.to(torch.int32), lengths.to(torch.int32), marker.to(device=tokens.device, dtype=torch.int32)


def last_marker_starts(tokens: torch.Tensor, lengths: torch.Tensor, marker: torch.Tensor) -> torch.Tensor:
    """int64 [K]: start of the last full marker span inside each row's first lengths[k] tokens, or -1."""
    K, L = tokens.shape
    m = marker.numel()
    if L < m:
        return torch.full((K,), -1, dtype=torch.int64, device=tokens.device)
    hits = (tokens.unfold(1, m, 1) == marker).all(-1)  # [K, L-m+1]: span at p matches
    starts = torch.arange(L - m + 1, device=tokens.device)
    hits &= starts + m <= lengths[:, None].long()
    return torch.where(hits, starts, -1).amax(1)


def compact_messages_ref(tokens: torch.Tensor, lengths: torch.Tensor, marker: torch.Tensor | Sequence[int],
                         max_tokens: int, keep_unclosed: bool = False) -> CompactedMessages:
    tokens, lengths, marker = check_compaction_args(tokens, lengths, marker, max_tokens)
    found = last_marker_starts(tokens, lengths, marker)
    n = lengths.long()
    closed = found >= 0
    unclosed_start = torch.zeros_like(n) if keep_unclosed else n
    start = torch.where(closed, found + marker.numel(), unclosed_start)
    raw = n - start
    keep = raw.clamp(max=max_tokens)
    offsets = torch.zeros(tokens.shape[0] + 1, dtype=torch.int64, device=tokens.device)
    torch.cumsum(keep, 0, out=offsets[1:])
    rows = torch.repeat_interleave(torch.arange(tokens.shape[0], device=tokens.device), keep)
    cols = start[rows] + torch.arange(rows.numel(), device=tokens.device) - offsets[rows]
    return CompactedMessages(tokens=tokens[rows, cols], offsets=offsets.to(torch.int32), closed=closed,
                             truncated=raw > max_tokens)

"""Batched message compaction in one CUDA launch (csrc/cuda/compaction.cu); CPU tensors use the reference.

Semantics: see compaction_ref.py. The kernel runs in a single CTA (one warp per row for the backwards marker
search, a block-wide prefix sum for the offsets, one warp per row for packing), so K is bounded by MAX_ROWS.
The packed size is only known after the kernel, so the result is read back with one synchronization.
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import cuda_launch as cl
from .compaction_ref import CompactedMessages, check_compaction_args, compact_messages_ref

MAX_ROWS = 4096  # kMaxRows in compaction.cu (shared-memory arrays of one CTA)


def compact_messages(tokens: torch.Tensor, lengths: torch.Tensor, marker: torch.Tensor | Sequence[int],
                     max_tokens: int, keep_unclosed: bool = False) -> CompactedMessages:
    """tokens [K, L] (padded), lengths [K], marker [m] token ids -> packed messages (see compaction_ref)."""
    if tokens.device.type != "cuda":
        return compact_messages_ref(tokens, lengths, marker, max_tokens, keep_unclosed)
    tokens, lengths, marker = check_compaction_args(tokens, lengths, marker, max_tokens)
    K, L = tokens.shape
    if K > MAX_ROWS:
        raise ValueError(f"compact_messages handles at most {MAX_ROWS} rows on CUDA, got K={K}")
    tokens, lengths = tokens.contiguous(), lengths.contiguous()
    device = tokens.device
    packed = torch.empty(K * min(L, max_tokens), dtype=torch.int32, device=device)
    offsets = torch.empty(K + 1, dtype=torch.int32, device=device)
    closed = torch.empty(K, dtype=torch.bool, device=device)
    truncated = torch.empty(K, dtype=torch.bool, device=device)
    if K == 0:
        offsets.zero_()
        return CompactedMessages(packed, offsets, closed, truncated)
    with torch.cuda.device(device):
        module = cl.load_module("compaction", device.index)
        cl.launch(module, "compact_messages", (1,), (32 * min(K, 32),),
                  [cl.ptr(tokens), cl.i64(L), cl.ptr(lengths), cl.i32(K), cl.ptr(marker), cl.i32(marker.numel()),
                   cl.i32(min(max_tokens, 2**31 - 1)), cl.i32(keep_unclosed), cl.ptr(packed), cl.ptr(offsets),
                   cl.ptr(closed), cl.ptr(truncated)])
    total = int(offsets[-1])
    return CompactedMessages(packed[:total].clone(), offsets, closed, truncated)

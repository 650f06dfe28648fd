"""Reference block copy: `cache[dst[i]] = cache[src[i]]` for every pair and every cache tensor (copy-on-write and
pool compaction). Also the engine's CPU path.

Pairs must be independent: the dst blocks are distinct and no dst block is also a source (the CUDA kernel copies
all pairs at once, so a chain such as 5 -> 2, 7 -> 5 has no defined order there).
"""
from __future__ import annotations

from typing import Sequence

import torch

IndexLike = torch.Tensor | Sequence[int]


def as_block_index(x: IndexLike, name: str) -> torch.Tensor:
    """A 1-D int64 index tensor (on the device it came from; lists land on the CPU)."""
    t = x if isinstance(x, torch.Tensor) else torch.tensor(list(x), dtype=torch.int64)
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got {t.dtype}")
    return t.to(torch.int64)


def check_caches(caches: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    caches = list(caches)
    if not caches:
        raise ValueError("copy_blocks needs at least one cache tensor")
    device = caches[0].device
    for i, c in enumerate(caches):
        if c.dim() < 1:
            raise ValueError(f"caches[{i}] must have a leading block dimension, got a scalar")
        if c.device != device:
            raise ValueError(f"caches[{i}] is on {c.device}, caches[0] on {device}")
    return caches


def check_block_pairs(src: torch.Tensor, dst: torch.Tensor, num_blocks: int) -> None:
    """Validate host-side indices: equal length, in range, dst distinct and never a source."""
    if src.shape != dst.shape:
        raise ValueError(f"src and dst differ in length: {src.numel()} vs {dst.numel()}")
    if src.numel() == 0:
        return
    for name, t in (("src", src), ("dst", dst)):
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= num_blocks:
            raise IndexError(f"{name} block ids must be in [0, {num_blocks}), got range [{lo}, {hi}]")
    if torch.unique(dst).numel() != dst.numel():
        raise ValueError("dst block ids must be distinct")
    if torch.isin(dst, src).any():
        raise ValueError("a dst block is also a src block; split the copy into independent batches")


def copy_blocks_ref(caches: Sequence[torch.Tensor], src: IndexLike, dst: IndexLike) -> None:
    """In place: for every cache, `cache[dst] = cache[src]` (all sources read before any write)."""
    caches = check_caches(caches)
    src, dst = as_block_index(src, "src"), as_block_index(dst, "dst")
    check_block_pairs(src.cpu(), dst.cpu(), min(c.shape[0] for c in caches))
    for c in caches:
        s, d = src.to(c.device), dst.to(c.device)
        c.index_copy_(0, d, c.index_select(0, s))

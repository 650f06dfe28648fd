"""Block copy over all layers' caches in one CUDA launch (csrc/cuda/block_copy.cu); CPU tensors use the reference.

The kernel takes a device array of cache base addresses and one of bytes per block, so `BlockCopier` builds them
once for a fixed list of caches (the engine's pool) and every call only ships the (src, dst) pairs.
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import cuda_launch as cl
from .block_copy_ref import IndexLike, as_block_index, check_block_pairs, check_caches, copy_blocks_ref

THREADS = 256
VECS_PER_THREAD = 4  # vectors each thread copies per chunk; more chunks (grid z) for bigger blocks


def vec_width(addresses: Sequence[int], sizes: Sequence[int]) -> int:
    """Widest access (16/8/4/2/1 bytes) aligned for every base address and bytes-per-block (as block_copy.h)."""
    bits = 0
    for v in (*addresses, *sizes):
        bits |= int(v)
    width = 16
    while width > 1 and bits & (width - 1):
        width >>= 1
    return width


class BlockCopier:
    """Copies blocks across a fixed list of cache tensors (each [num_blocks, ...], contiguous, one device)."""

    def __init__(self, caches: Sequence[torch.Tensor]):
        self.caches = check_caches(caches)
        self.num_blocks = min(c.shape[0] for c in self.caches)
        self.device = self.caches[0].device
        if self.device.type != "cuda":
            return
        for i, c in enumerate(self.caches):
            if not c.is_contiguous():
                raise ValueError(f"caches[{i}] must be contiguous (shape {tuple(c.shape)}, strides {c.stride()})")
        bases = [c.data_ptr() for c in self.caches]
        sizes = [c.stride(0) * c.element_size() if c.shape[0] else 0 for c in self.caches]
        if len(self.caches) > 65535:
            raise ValueError(f"at most 65535 cache tensors per copier, got {len(self.caches)}")
        self.width = vec_width(bases, sizes)
        self.chunks = max(1, -(-max(sizes) // (self.width * THREADS * VECS_PER_THREAD)))
        self._bases = torch.tensor(bases, dtype=torch.int64, device=self.device)
        self._sizes = torch.tensor(sizes, dtype=torch.int64, device=self.device)

    def __call__(self, src: IndexLike, dst: IndexLike) -> None:
        """In place: every cache gets `cache[dst[i]] = cache[src[i]]`. Host-side indices (lists, CPU tensors) are
        validated; CUDA index tensors are trusted (checking them would synchronize)."""
        if self.device.type != "cuda":
            copy_blocks_ref(self.caches, src, dst)
            return
        src, dst = as_block_index(src, "src"), as_block_index(dst, "dst")
        if src.device.type == "cpu" and dst.device.type == "cpu":
            check_block_pairs(src, dst, self.num_blocks)
        elif src.shape != dst.shape:
            raise ValueError(f"src and dst differ in length: {src.numel()} vs {dst.numel()}")
        n = src.numel()
        if n == 0:
            return
        if n >= 2**31:
            raise ValueError(f"too many block pairs for one launch: {n}")
        pairs = torch.stack([src.to(self.device), dst.to(self.device)])
        with torch.cuda.device(self.device):
            module = cl.load_module("block_copy", self.device.index)
            cl.launch(module, f"block_copy_w{self.width}", (n, len(self.caches), self.chunks), (THREADS,),
                      [cl.ptr(self._bases), cl.ptr(self._sizes), cl.ptr(pairs[0]), cl.ptr(pairs[1]),
                       cl.i64(THREADS * VECS_PER_THREAD)])


def copy_blocks(caches: Sequence[torch.Tensor], src: IndexLike, dst: IndexLike) -> None:
    """In place, for every cache tensor: `cache[dst[i]] = cache[src[i]]`; one launch on CUDA (see BlockCopier)."""
    BlockCopier(caches)(src, dst)

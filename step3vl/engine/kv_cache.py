"""The paged KV pool: per layer one K and one V tensor of [num_blocks, block_size, kv_heads, head_dim]."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from step3vl.config import TextConfig


def block_bytes(cfg: TextConfig, block_size: int, dtype: torch.dtype) -> int:
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * itemsize


@dataclass(eq=False)
class KVCache:
    k: list[torch.Tensor]
    v: list[torch.Tensor]
    block_size: int

    @classmethod
    def allocate(cls, cfg: TextConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device) -> "KVCache":
        shape = (num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
        k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        return cls(k, v, block_size)

    @property
    def num_blocks(self) -> int:
        return self.k[0].shape[0]

    @property
    def bytes_per_block(self) -> int:
        return 2 * len(self.k) * self.k[0][0].numel() * self.k[0].element_size()

    def copy_blocks(self, src: list[int], dst: list[int]) -> None:
        """Copy-on-write: every layer's K/V of block src[i] into block dst[i], in one call where possible."""
        if not src:
            return
        if set(src) & set(dst):
            # A block freed and reused within one step can be the source of an earlier copy and the target of
            # a later one: run those in order, one pair at a time (rare).
            for a, b in zip(src, dst):
                self.copy_blocks([a], [b])
            return
        device = self.k[0].device
        s = torch.tensor(src, dtype=torch.int64, device=device)
        d = torch.tensor(dst, dtype=torch.int64, device=device)
        if device.type == "cuda":
            from step3vl_kernels.block_copy import copy_blocks
            copy_blocks(self.k + self.v, s, d)
            return
        for cache in (*self.k, *self.v):
            cache.index_copy_(0, d, cache.index_select(0, s))

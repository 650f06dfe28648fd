"""Reference KV-cache write: new k/v rows into their cache slots (slot = block * block_size + offset)."""
from __future__ import annotations

from torch import Tensor


def check_write(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    if k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"write_kv: k and v must both be [T, Hkv, D], got {tuple(k.shape)} and {tuple(v.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"write_kv: caches must both be [num_blocks, block_size, Hkv, D], "
                         f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if k.shape[1:] != k_cache.shape[2:]:
        raise ValueError(f"write_kv: k rows are [Hkv, D] = {tuple(k.shape[1:])} but cache rows are "
                         f"{tuple(k_cache.shape[2:])}")
    if slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"write_kv: slot_mapping must be [{k.shape[0]}], got {tuple(slot_mapping.shape)}")


def write_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """In place: cache slot slot_mapping[t] <- k[t], v[t]; slots < 0 are skipped."""
    check_write(k, v, k_cache, v_cache, slot_mapping)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    n_slots = k_cache.shape[0] * k_cache.shape[1]
    k_flat = k_cache.view(n_slots, *k_cache.shape[2:])
    v_flat = v_cache.view(n_slots, *v_cache.shape[2:])
    k_flat.index_copy_(0, slots, k[keep].to(k_cache.dtype))
    v_flat.index_copy_(0, slots, v[keep].to(v_cache.dtype))


write_kv_ref = write_kv

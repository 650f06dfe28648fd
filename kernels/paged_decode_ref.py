"""Reference paged decode attention (one query token per sequence), LSE merge and cascade decode.

KV cache: k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim]; a sequence's token t lives in
block block_tables[b, t // block_size] at offset t % block_size. GQA: q head h reads kv head h // (Hq // Hkv).

LSE convention (the one place it is pinned down for every kernel here): lse = natural log (base e) of the
sum over keys of exp(scale * q.k). An empty key set has lse = -inf and output 0, and merging with an empty
part returns the other part unchanged. Merging two parts over disjoint key sets:
    lse = log(e^lse1 + e^lse2),  o = (o1 e^lse1 + o2 e^lse2) / (e^lse1 + e^lse2).

All functions compute in fp32 and return the query dtype (lse in fp32). They are the engine's CPU path.
"""
from __future__ import annotations

import torch
from torch import Tensor


def check_cache(k_cache: Tensor, v_cache: Tensor, num_q_heads: int, head_dim: int, fn: str) -> None:
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"{fn}: k_cache/v_cache must both be [num_blocks, block_size, Hkv, D], "
                         f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    hkv, d = k_cache.shape[2], k_cache.shape[3]
    if d != head_dim:
        raise ValueError(f"{fn}: head_dim of q ({head_dim}) != head_dim of the cache ({d})")
    if num_q_heads % hkv != 0:
        raise ValueError(f"{fn}: num_q_heads {num_q_heads} is not a multiple of num_kv_heads {hkv}")


def gather_kv(k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, lens: Tensor,
              max_len: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Dense copies of each row's keys/values: -> k, v [B, L, Hkv, D] and valid [B, L] (position < lens[b]).

    L = max_len if given, else max(lens) (one host sync). Entries past a row's length are arbitrary blocks
    (the padding of the block table is clamped into range) and masked by `valid`.
    """
    bs = k_cache.shape[1]
    if max_len is None:
        max_len = int(lens.max().item()) if lens.numel() else 0
    nblk = -(-max_len // bs)
    if nblk > block_tables.shape[1]:
        raise ValueError(f"gather_kv: length {max_len} needs {nblk} blocks but block_tables has "
                         f"{block_tables.shape[1]} columns")
    blocks = block_tables[:, :nblk].long().clamp(0, k_cache.shape[0] - 1)
    b = blocks.shape[0]
    k = k_cache[blocks].reshape(b, nblk * bs, *k_cache.shape[2:])[:, :max_len]
    v = v_cache[blocks].reshape(b, nblk * bs, *v_cache.shape[2:])[:, :max_len]
    pos = torch.arange(max_len, device=lens.device)
    return k, v, pos[None, :] < lens.long()[:, None]


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Masked dense attention with LSE, GQA aware, in fp32.

    q [B, Q, Hq, D]; k, v [B, L, Hkv, D]; mask [B, Q, L] or [B, 1, L] (True = attend).
    -> out [B, Q, Hq, D] fp32, lse [B, Q, Hq] fp32 (natural log; -inf and out 0 where no key is allowed).
    """
    bsz, nq, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    qf = q.float().reshape(bsz, nq, hkv, g, d)
    s = torch.einsum("bqhgd,blhd->bhgql", qf, k.float()) * scale
    s = s.masked_fill(~mask[:, None, None, :, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [B, Hkv, G, Q]
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[..., None])
    out = torch.einsum("bhgql,blhd->bqhgd", p, v.float()).reshape(bsz, nq, hq, d)
    return out, lse.permute(0, 3, 1, 2).reshape(bsz, nq, hq)


def paged_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
                 scale: float, return_lse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """q [B, Hq, D] -> out [B, Hq, D] (, lse [B, Hq] fp32): each row against its first seq_lens[b] keys."""
    if q.dim() != 3:
        raise ValueError(f"paged_decode: q must be [B, Hq, D], got {tuple(q.shape)}")
    check_cache(k_cache, v_cache, q.shape[1], q.shape[2], "paged_decode")
    if block_tables.shape[0] != q.shape[0] or seq_lens.shape != (q.shape[0],):
        raise ValueError(f"paged_decode: batch {q.shape[0]} but block_tables {tuple(block_tables.shape)}, "
                         f"seq_lens {tuple(seq_lens.shape)}")
    k, v, valid = gather_kv(k_cache, v_cache, block_tables, seq_lens)
    out, lse = attend(q[:, None], k, v, valid[:, None, :], scale)
    out = out[:, 0].to(q.dtype)
    return (out, lse[:, 0]) if return_lse else out


def merge_attn_states(o1: Tensor, lse1: Tensor, o2: Tensor, lse2: Tensor) -> tuple[Tensor, Tensor]:
    """Merge attention over two disjoint key sets: o [..., D], lse [...] -> (o in o1's dtype, lse fp32)."""
    if o1.shape != o2.shape or lse1.shape != lse2.shape or o1.shape[:-1] != lse1.shape:
        raise ValueError(f"merge_attn_states: shapes o1 {tuple(o1.shape)}, o2 {tuple(o2.shape)}, "
                         f"lse1 {tuple(lse1.shape)}, lse2 {tuple(lse2.shape)} do not match")
    l1, l2 = lse1.float(), lse2.float()
    m = torch.maximum(l1, l2)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w1, w2 = torch.exp(l1 - m_safe), torch.exp(l2 - m_safe)
    den = w1 + w2
    den_safe = torch.where(den > 0, den, torch.ones_like(den))
    out = (o1.float() * w1[..., None] + o2.float() * w2[..., None]) / den_safe[..., None]
    lse = torch.where(den > 0, m_safe + torch.log(den_safe), torch.full_like(den, float("-inf")))
    return out.to(o1.dtype), lse


def group_rows(seq_group: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """CSR of the query rows of each group without a host sync: -> (rows sorted by group, indptr [G+1])."""
    order = torch.argsort(seq_group.long(), stable=True)
    counts = torch.zeros(num_groups, dtype=torch.int64, device=seq_group.device)
    counts.index_add_(0, seq_group.long(), torch.ones_like(seq_group, dtype=torch.int64))
    indptr = torch.zeros(num_groups + 1, dtype=torch.int64, device=seq_group.device)
    indptr[1:] = torch.cumsum(counts, 0)
    return order, indptr


def check_cascade(q: Tensor, k_cache: Tensor, prefix_block_tables: Tensor, prefix_lens: Tensor,
                  seq_group: Tensor, suffix_block_tables: Tensor, suffix_lens: Tensor) -> None:
    b = q.shape[0]
    g = prefix_block_tables.shape[0]
    if q.dim() != 3:
        raise ValueError(f"cascade_decode: q must be [B, Hq, D], got {tuple(q.shape)}")
    if prefix_lens.shape != (g,):
        raise ValueError(f"cascade_decode: prefix_lens must be [{g}] (one per prefix_block_tables row), "
                         f"got {tuple(prefix_lens.shape)}")
    for name, t in (("seq_group", seq_group), ("suffix_lens", suffix_lens)):
        if t.shape != (b,):
            raise ValueError(f"cascade_decode: {name} must be [{b}], got {tuple(t.shape)}")
    if suffix_block_tables.dim() != 2 or suffix_block_tables.shape[0] != b:
        raise ValueError(f"cascade_decode: suffix_block_tables must be [{b}, S], "
                         f"got {tuple(suffix_block_tables.shape)}")


def cascade_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, prefix_block_tables: Tensor,
                   prefix_lens: Tensor, seq_group: Tensor, suffix_block_tables: Tensor, suffix_lens: Tensor,
                   scale: float) -> Tensor:
    """Decode where row b's keys are its group's shared prefix followed by its own suffix -> out [B, Hq, D].

    Each group's prefix is gathered once and attended by all of the group's rows together (loop over
    groups), the suffixes per row, and the two parts are merged by LSE.
    """
    check_cascade(q, k_cache, prefix_block_tables, prefix_lens, seq_group, suffix_block_tables, suffix_lens)
    check_cache(k_cache, v_cache, q.shape[1], q.shape[2], "cascade_decode")
    bs = k_cache.shape[1]
    if bool((prefix_lens % bs != 0).any()):
        raise ValueError(f"cascade_decode: prefix_lens {prefix_lens.tolist()} must be multiples of "
                         f"block_size {bs}")
    o_pre, lse_pre = prefix_attention(q, k_cache, v_cache, prefix_block_tables, prefix_lens, seq_group, scale)
    o_suf, lse_suf = paged_decode(q, k_cache, v_cache, suffix_block_tables, suffix_lens, scale,
                                  return_lse=True)
    out, _ = merge_attn_states(o_pre, lse_pre, o_suf.float(), lse_suf)
    return out.to(q.dtype)


def prefix_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, prefix_block_tables: Tensor,
                     prefix_lens: Tensor, seq_group: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Each row against its group's prefix, one gather per group -> (out [B, Hq, D] fp32, lse [B, Hq])."""
    bsz, hq, d = q.shape
    out = torch.zeros(bsz, hq, d, dtype=torch.float32, device=q.device)
    lse = torch.full((bsz, hq), float("-inf"), dtype=torch.float32, device=q.device)
    lens = prefix_lens.tolist()
    groups = seq_group.long()
    for g, plen in enumerate(lens):
        rows = torch.nonzero(groups == g).flatten()
        if plen == 0 or rows.numel() == 0:
            continue
        k, v, valid = gather_kv(k_cache, v_cache, prefix_block_tables[g:g + 1], prefix_lens[g:g + 1], plen)
        # All rows of the group share the keys: treat them as Q query positions of one sequence.
        o, l = attend(q[rows][None], k, v, valid[:, None, :], scale)
        out[rows], lse[rows] = o[0], l[0]
    return out, lse


# Same functions under the names of the kernel-reference pairs, for callers that prefer explicit names.
paged_decode_ref = paged_decode
cascade_decode_ref = cascade_decode
merge_attn_states_ref = merge_attn_states

"""Triton paged decode attention: GQA, block tables, split-K merged by LSE, and a cascade (shared-prefix) mode.

Semantics and the LSE convention are those of paged_decode_ref.py. Design:
- One program owns one kv head and a slice ("split") of the context. Its M dimension holds the queries that
  share those keys: the GQA heads of one row (plain decode), or every row of a prefix group times the GQA
  heads (cascade prefix), so a prefix tile is read once for the whole group.
- Each split writes a partial (o, lse); a second kernel merges the splits by LSE. With one split the first
  kernel writes the output directly. In cascade mode one launch holds both the prefix programs and the
  suffix programs, so a cascade step is two launches like a plain one.
- Keys are gathered token by token through the block table (pos // block_size), so any block size works and
  a tile may span several pages.
- No host syncs: grids are sized from tensor shapes (block_tables columns), programs past a row's length
  exit after writing an empty partial (lse = -inf).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._triton_utils import cdiv, check_device, check_float, device_sms, interpreting, next_pow2
from .paged_decode_ref import check_cache, check_cascade
from .paged_decode_ref import merge_attn_states as _merge_ref

LOG2E = 1.4426950408889634


@triton.jit
def _decode_split_kernel(
        Q, K, V, BT, LENS, BT2, LENS2, ROWS, ROW_PTR, O_PART, L_PART, OUT, LSE,
        stride_qb, stride_qh, stride_kb, stride_ks, stride_kh, stride_bt, stride_bt2,
        stride_ob, stride_oh, n_q_heads, n_parts, n_groups,
        block_size, part_size, n_splits, part_size2, n_splits2, qk_scale,
        GH: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, CASCADE: tl.constexpr, DIRECT: tl.constexpr, UPCAST: tl.constexpr,
        PREC: tl.constexpr):
    pid0 = tl.program_id(0)
    kvh = tl.program_id(1)
    pid2 = tl.program_id(2)
    m = tl.arange(0, BLOCK_M)
    if CASCADE:
        if pid0 < n_groups:
            # Prefix of group pid0: M packs (row of the group, GQA head), rows from the CSR (ROWS, ROW_PTR),
            # so each prefix K/V tile is loaded once for every query of the group.
            split = pid2 % n_splits
            mt = pid2 // n_splits
            mm = m + mt * BLOCK_M
            r0 = tl.load(ROW_PTR + pid0)
            n_rows = tl.load(ROW_PTR + pid0 + 1) - r0
            valid_m = (mm // GH) < n_rows
            qrow = tl.load(ROWS + r0 + mm // GH, mask=valid_m, other=0)
            hh = mm % GH
            table = BT + pid0 * stride_bt
            ctx = tl.load(LENS + pid0)
            ctx = tl.where((mt * BLOCK_M) // GH < n_rows, ctx, 0)  # m-tiles past the group: no work
            start = split * part_size
            end = tl.minimum(start + part_size, ctx)
            slot = split
        else:
            # Suffix of row b, written after the prefix partials (the last n_splits2 slots).
            b = pid0 - n_groups
            valid_m = m < tl.where(pid2 < n_splits2, GH, 0)  # the grid's split axis may be wider
            qrow = tl.zeros([BLOCK_M], dtype=tl.int32) + b
            hh = m
            table = BT2 + b * stride_bt2
            ctx = tl.load(LENS2 + b)
            start = pid2 * part_size2
            end = tl.minimum(start + part_size2, ctx)
            slot = n_parts - n_splits2 + pid2
    else:
        valid_m = m < GH
        qrow = tl.zeros([BLOCK_M], dtype=tl.int32) + pid0
        hh = m
        table = BT + pid0 * stride_bt
        ctx = tl.load(LENS + pid0)
        start = pid2 * part_size
        end = tl.minimum(start + part_size, ctx)
        slot = pid2
    head = kvh * GH + hh
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_D
    q = tl.load(Q + qrow[:, None] * stride_qb + head[:, None] * stride_qh + d[None, :],
                mask=valid_m[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_off = tl.arange(0, BLOCK_N)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + n_off
        valid_n = pos < end
        page = tl.load(table + pos // block_size, mask=valid_n, other=0).to(tl.int64)
        kv_off = page * stride_kb + (pos % block_size) * stride_ks + kvh * stride_kh
        kv_mask = valid_n[:, None] & d_ok[None, :]
        k = tl.load(K + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        s = tl.where(valid_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    # qk_scale carries log2(e): convert the base-2 running max back to a natural-log LSE.
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) / 1.4426950408889634, float("-inf"))
    st_mask = valid_m[:, None] & d_ok[None, :]
    row_head = qrow.to(tl.int64) * n_q_heads + head  # index into [B, Hq]
    if DIRECT:
        tl.store(OUT + qrow[:, None] * stride_ob + head[:, None] * stride_oh + d[None, :],
                 o.to(OUT.dtype.element_ty), mask=st_mask)
        tl.store(LSE + row_head, lse, mask=valid_m)
    else:
        part = row_head * n_parts + slot  # index into [B, Hq, n_parts]
        tl.store(O_PART + part[:, None] * HEAD_D + d[None, :], o, mask=st_mask)
        tl.store(L_PART + part, lse, mask=valid_m)


@triton.jit
def _merge_splits_kernel(O_PART, L_PART, OUT, LSE, n_parts, stride_ob, stride_oh,
                         HEAD_D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    row_head = b.to(tl.int64) * tl.num_programs(1) + h
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    lse = tl.load(L_PART + row_head * n_parts + s, mask=s < n_parts, other=float("-inf"))
    m = tl.max(lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    den = tl.sum(tl.exp(lse - m_safe), 0)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(0, n_parts):
        w_i = tl.exp(tl.load(L_PART + row_head * n_parts + i) - m_safe)
        o_i = tl.load(O_PART + (row_head * n_parts + i) * HEAD_D + d, mask=d < HEAD_D, other=0.0)
        acc += w_i * o_i
    has = den > 0
    out = acc / tl.where(has, den, 1.0)
    tl.store(OUT + b * stride_ob + h * stride_oh + d, out.to(OUT.dtype.element_ty), mask=d < HEAD_D)
    tl.store(LSE + row_head, tl.where(has, m_safe + tl.log(tl.where(has, den, 1.0)), float("-inf")))


@dataclass(frozen=True, slots=True)
class CascadePlan:
    """Rows of each prefix group as CSR; depends only on seq_group, so one plan serves every layer."""
    rows: Tensor     # int32 [B]: query rows sorted by group
    row_ptr: Tensor  # int32 [G+1]: rows[row_ptr[g]:row_ptr[g+1]] belong to group g
    num_groups: int


def cascade_plan(seq_group: Tensor, num_groups: int) -> CascadePlan:
    order = torch.argsort(seq_group.long(), stable=True)
    counts = torch.zeros(num_groups, dtype=torch.int64, device=seq_group.device)
    counts.index_add_(0, seq_group.long(), torch.ones_like(order))
    row_ptr = torch.zeros(num_groups + 1, dtype=torch.int32, device=seq_group.device)
    row_ptr[1:] = torch.cumsum(counts, 0)
    return CascadePlan(order.to(torch.int32), row_ptr, num_groups)


@dataclass(frozen=True, slots=True)
class _Tiles:
    block_n: int
    num_warps: int
    num_stages: int
    min_part: int


def _tiles(dtype: torch.dtype, head_dim: int) -> _Tiles:
    if interpreting():
        return _Tiles(block_n=16, num_warps=4, num_stages=1, min_part=32)
    block_n = 32 if dtype == torch.float32 or head_dim > 128 else 64
    return _Tiles(block_n=block_n, num_warps=4, num_stages=3, min_part=4 * block_n)


def _split(max_ctx: int, base_programs: int, sms: int, tiles: _Tiles, num_splits: int | None) -> tuple[int, int]:
    """-> (n_splits, part_size): enough programs to fill the GPU twice, each split >= min_part tokens."""
    if num_splits is None:
        num_splits = min(cdiv(2 * sms, max(base_programs, 1)), cdiv(max_ctx, tiles.min_part))
    num_splits = max(1, min(num_splits, cdiv(max(max_ctx, 1), tiles.block_n)))
    part = cdiv(cdiv(max(max_ctx, 1), num_splits), tiles.block_n) * tiles.block_n
    return max(1, cdiv(max_ctx, part)), part


def _check_q(fn: str, q: Tensor, k_cache: Tensor, v_cache: Tensor) -> None:
    if q.dim() != 3:
        raise ValueError(f"{fn}: q must be [B, Hq, D], got {tuple(q.shape)}")
    check_cache(k_cache, v_cache, q.shape[1], q.shape[2], fn)
    check_float(fn, q=q, k_cache=k_cache)
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1:
        raise ValueError(f"{fn}: q and the caches need a contiguous last dimension")
    if k_cache.stride() != v_cache.stride() or k_cache.dtype != v_cache.dtype:
        raise ValueError(f"{fn}: k_cache and v_cache must share dtype and strides")


def _launch_split(q, k_cache, v_cache, grid, *, bt, lens, bt2=None, lens2=None, rows=None, row_ptr=None,
                  o_part, l_part, out, lse, block_m: int, cascade: bool, direct: bool, n_groups: int = 0,
                  n_splits: int, part: int, n_splits2: int = 0, part2: int = 0, n_parts: int, scale: float,
                  tiles: _Tiles) -> None:
    hq, d = q.shape[1], q.shape[2]
    hkv = k_cache.shape[2]
    bt2 = bt if bt2 is None else bt2
    lens2 = lens if lens2 is None else lens2
    upcast = interpreting() or k_cache.dtype == torch.float32
    _decode_split_kernel[grid](
        q, k_cache, v_cache, bt, lens, bt2, lens2, lens if rows is None else rows,
        lens if row_ptr is None else row_ptr, o_part, l_part, out, lse,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), bt.stride(0),
        bt2.stride(0), out.stride(0), out.stride(1), hq, n_parts, n_groups,
        k_cache.shape[1], part, n_splits, part2, n_splits2, scale * LOG2E,
        GH=hq // hkv, HEAD_D=d, BLOCK_M=block_m, BLOCK_N=tiles.block_n, BLOCK_D=max(16, next_pow2(d)),
        CASCADE=cascade, DIRECT=direct, UPCAST=upcast,
        PREC="ieee" if k_cache.dtype == torch.float32 or upcast else "tf32",
        num_warps=tiles.num_warps, num_stages=tiles.num_stages)


def _merge(o_part: Tensor, l_part: Tensor, out: Tensor, lse: Tensor) -> None:
    b, hq, n_parts, d = o_part.shape
    _merge_splits_kernel[(b, hq)](o_part, l_part, out, lse, n_parts, out.stride(0), out.stride(1),
                                  HEAD_D=d, BLOCK_S=max(16, next_pow2(n_parts)), BLOCK_D=max(16, next_pow2(d)),
                                  num_warps=4)


def paged_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
                 scale: float, return_lse: bool = False, *, num_splits: int | None = None,
                 max_seq_len: int | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """q [B, Hq, D] -> out [B, Hq, D] (, lse [B, Hq] fp32). See paged_decode_ref.paged_decode.

    num_splits forces the split-K factor (tests); max_seq_len bounds the context (default: block table width).
    """
    _check_q("paged_decode", q, k_cache, v_cache)
    bsz, hq, d = q.shape
    if block_tables.shape[0] != bsz or seq_lens.shape != (bsz,):
        raise ValueError(f"paged_decode: batch {bsz} but block_tables {tuple(block_tables.shape)}, "
                         f"seq_lens {tuple(seq_lens.shape)}")
    check_device("paged_decode", q, k_cache, v_cache, block_tables, seq_lens)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(bsz, hq, dtype=torch.float32, device=q.device)
    if bsz == 0:
        return (out, lse) if return_lse else out
    hkv = k_cache.shape[2]
    tiles = _tiles(k_cache.dtype, d)
    max_ctx = max_seq_len if max_seq_len is not None else block_tables.shape[1] * k_cache.shape[1]
    n_splits, part = _split(max_ctx, bsz * hkv, device_sms(q), tiles, num_splits)
    block_m = max(16, next_pow2(hq // hkv))
    direct = n_splits == 1
    o_part = l_part = out  # placeholders when the kernel writes the output directly
    if not direct:
        o_part = torch.empty(bsz, hq, n_splits, d, dtype=torch.float32, device=q.device)
        l_part = torch.empty(bsz, hq, n_splits, dtype=torch.float32, device=q.device)
    _launch_split(q, k_cache, v_cache, (bsz, hkv, n_splits), bt=block_tables, lens=seq_lens, o_part=o_part,
                  l_part=l_part, out=out, lse=lse, block_m=block_m, cascade=False, direct=direct,
                  n_splits=n_splits, part=part, n_parts=n_splits, scale=scale, tiles=tiles)
    if not direct:
        _merge(o_part, l_part, out, lse)
    return (out, lse) if return_lse else out


def cascade_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, prefix_block_tables: Tensor,
                   prefix_lens: Tensor, seq_group: Tensor, suffix_block_tables: Tensor, suffix_lens: Tensor,
                   scale: float, *, plan: CascadePlan | None = None, num_splits: int | None = None) -> Tensor:
    """Shared-prefix decode -> out [B, Hq, D]. See paged_decode_ref.cascade_decode.

    One launch computes every partial: programs g < G read group g's prefix once per kv head for all of its
    rows x GQA heads (the M dimension of the tile), programs G + b row b's suffix; a second launch merges the
    prefix and suffix partials by LSE. Tables and lengths are int32.
    plan: cascade_plan(seq_group, G), computed once per step and shared by the layers (else built here).
    prefix_lens must be multiples of block_size (not checked here: that would need a host sync).
    """
    _check_q("cascade_decode", q, k_cache, v_cache)
    check_cascade(q, k_cache, prefix_block_tables, prefix_lens, seq_group, suffix_block_tables, suffix_lens)
    check_device("cascade_decode", q, k_cache, v_cache, prefix_block_tables, prefix_lens, seq_group,
                 suffix_block_tables, suffix_lens)
    for name, t in (("prefix_block_tables", prefix_block_tables), ("prefix_lens", prefix_lens),
                    ("suffix_block_tables", suffix_block_tables), ("suffix_lens", suffix_lens)):
        if t.dtype != torch.int32:  # one kernel reads prefix and suffix tables through the same code path
            raise ValueError(f"cascade_decode: {name} must be int32, got {t.dtype}")
    bsz, hq, d = q.shape
    n_groups = prefix_block_tables.shape[0]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if bsz == 0:
        return out
    if plan is None:
        plan = cascade_plan(seq_group, n_groups)
    elif plan.num_groups != n_groups or plan.rows.shape != (bsz,):
        raise ValueError(f"cascade_decode: plan is for {plan.num_groups} groups / {plan.rows.shape[0]} rows, "
                         f"call has {n_groups} / {bsz}")
    hkv, bs = k_cache.shape[2], k_cache.shape[1]
    gh = hq // hkv
    tiles = _tiles(k_cache.dtype, d)
    sms = device_sms(q)
    block_m = max(next_pow2(gh), 16 if interpreting() else min(64, max(16, next_pow2(bsz * gh))))
    m_tiles = cdiv(bsz * gh, block_m)
    sp, part_p = _split(prefix_block_tables.shape[1] * bs, n_groups * hkv, sms, tiles, num_splits)
    sp = sp if n_groups > 0 else 0  # no prefix partials at all
    ss, part_s = _split(suffix_block_tables.shape[1] * bs, bsz * hkv, sms, tiles, num_splits)
    o_part = torch.empty(bsz, hq, sp + ss, d, dtype=torch.float32, device=q.device)
    l_part = torch.empty(bsz, hq, sp + ss, dtype=torch.float32, device=q.device)
    lse = torch.empty(bsz, hq, dtype=torch.float32, device=q.device)
    # One launch: programs (g < G) do group g's prefix, programs (G + b) row b's suffix.
    _launch_split(q, k_cache, v_cache, (n_groups + bsz, hkv, max(sp * m_tiles, ss)), bt=prefix_block_tables,
                  lens=prefix_lens, bt2=suffix_block_tables, lens2=suffix_lens, rows=plan.rows,
                  row_ptr=plan.row_ptr, o_part=o_part, l_part=l_part, out=out, lse=lse, block_m=block_m,
                  cascade=True, direct=False, n_groups=n_groups, n_splits=max(sp, 1), part=part_p, n_splits2=ss,
                  part2=part_s, n_parts=sp + ss, scale=scale, tiles=tiles)
    _merge(o_part, l_part, out, lse)
    return out


def merge_attn_states(o1: Tensor, lse1: Tensor, o2: Tensor, lse2: Tensor) -> tuple[Tensor, Tensor]:
    """LSE merge of two partial attentions (torch ops; the kernels merge their own splits in-kernel)."""
    return _merge_ref(o1, lse1, o2, lse2)

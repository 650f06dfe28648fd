"""CPU cascade (shared-prefix) decode attention: the C++ kernel in csrc/cpu_attention.cpp.

Same contract as paged_decode_ref.cascade_decode (its reference): row b attends to its group's prefix
followed by its own suffix. Tasks stream 256-token chunks straight from the paged pool, whole
[token, Hkv, D] rows at a time: a chunk of a group's prefix for all of the group's rows x heads (the prefix is
read once per group), or a chunk of one row's suffix; their online-softmax partials are merged per row in a
fixed order, so a row's result does not depend on the rest of the batch. AVX-512 where the CPU has it
(checked at run time), a portable loop elsewhere. Tasks run on OpenMP threads: the runtime torch itself uses,
so torch.set_num_threads applies.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .paged_decode_ref import check_cache, check_cascade, group_rows
from .native import native

_KV_DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class CpuCascadePlan:
    """Rows sorted by group and the CSR offsets (int32), built once per step and shared by every layer."""
    rows: Tensor
    indptr: Tensor
    num_groups: int


def cpu_cascade_plan(seq_group: Tensor, num_groups: int) -> CpuCascadePlan:
    rows, indptr = group_rows(seq_group, num_groups)
    return CpuCascadePlan(rows.to(torch.int32), indptr.to(torch.int32), num_groups)


def _int32(name: str, t: Tensor) -> Tensor:
    if t.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cascade_decode_cpu: {name} must be an integer tensor, got {t.dtype}")
    return t.to(torch.int32).contiguous()


def cascade_decode_cpu(q: Tensor, k_cache: Tensor, v_cache: Tensor, prefix_block_tables: Tensor,
                       prefix_lens: Tensor, seq_group: Tensor, suffix_block_tables: Tensor, suffix_lens: Tensor,
                       scale: float, *, plan: CpuCascadePlan | None = None, simd: bool = True) -> Tensor:
    """-> out [B, Hq, D] in q's dtype (computed in fp32). simd=False forces the portable path (tests compare
    both)."""
    step3vl_native = native()

    check_cascade(q, k_cache, prefix_block_tables, prefix_lens, seq_group, suffix_block_tables, suffix_lens)
    check_cache(k_cache, v_cache, q.shape[1], q.shape[2], "cascade_decode_cpu")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("prefix_block_tables", prefix_block_tables),
                    ("prefix_lens", prefix_lens), ("seq_group", seq_group), ("suffix_block_tables", suffix_block_tables),
                    ("suffix_lens", suffix_lens)):
        if t.device.type != "cpu":
            raise ValueError(f"cascade_decode_cpu: {name} is on {t.device}; this kernel runs on the CPU")
    if k_cache.dtype not in _KV_DTYPES or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"cascade_decode_cpu: the KV cache must be fp32 or bf16 (k {k_cache.dtype}, "
                         f"v {v_cache.dtype})")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("cascade_decode_cpu: k_cache and v_cache must be contiguous")
    bsz, hq, d = q.shape
    n_groups = prefix_block_tables.shape[0]
    if plan is None:
        plan = cpu_cascade_plan(seq_group, n_groups)
    elif plan.num_groups != n_groups or plan.rows.shape != (bsz,):
        raise ValueError(f"cascade_decode_cpu: plan is for {plan.num_groups} groups / {plan.rows.shape[0]} rows, "
                         f"call has {n_groups} / {bsz}")
    qf = q.to(torch.float32).contiguous()
    out = torch.empty(bsz, hq, d, dtype=torch.float32)
    if bsz == 0:
        return out.to(q.dtype)
    pt, pl = _int32("prefix_block_tables", prefix_block_tables), _int32("prefix_lens", prefix_lens)
    st, sl = _int32("suffix_block_tables", suffix_block_tables), _int32("suffix_lens", suffix_lens)
    step3vl_native.cpu_cascade_decode(
        qf.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), k_cache.dtype == torch.bfloat16,
        k_cache.shape[0], k_cache.shape[1], k_cache.shape[2], hq, d, bsz, n_groups,
        pt.data_ptr(), pt.shape[1], pl.data_ptr(), plan.rows.data_ptr(), plan.indptr.data_ptr(),
        st.data_ptr(), st.shape[1], sl.data_ptr(), float(scale), out.data_ptr(), simd)
    return out if q.dtype == torch.float32 else out.to(q.dtype)

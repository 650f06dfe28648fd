"""Paged decode and cascade decode: references against dense attention, the LSE merge identity, and the
Triton kernels against the references (interpreter on the CPU)."""
import math

import pytest
import torch
import torch.nn.functional as F

from step3vl_kernels import paged_decode as pd
from step3vl_kernels import paged_decode_ref as ref

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _cache(n_blocks, bs, hkv, d, dtype, g):
    return (torch.randn(n_blocks, bs, hkv, d, generator=g).to(dtype),
            torch.randn(n_blocks, bs, hkv, d, generator=g).to(dtype))


def _tables(lens, bs, width, n_blocks, g):
    """Distinct blocks per row (like an allocator), padded with -1."""
    perm = torch.randperm(n_blocks, generator=g).tolist()
    rows = []
    for n in lens:
        need = -(-n // bs)
        rows.append(perm[:need] + [-1] * (width - need))
        perm = perm[need:]
    return torch.tensor(rows, dtype=torch.int32)


def _dense(q, k_cache, v_cache, table, n, scale):
    """One row by hand: token-by-token K/V gather, SDPA for the output, logsumexp for the LSE."""
    hq, d = q.shape
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    if n == 0:
        return torch.zeros(hq, d), torch.full((hq,), -math.inf)
    k = torch.stack([k_cache[table[t // bs], t % bs] for t in range(n)]).float()  # [n, Hkv, D]
    v = torch.stack([v_cache[table[t // bs], t % bs] for t in range(n)]).float()
    k = k.repeat_interleave(hq // hkv, dim=1).transpose(0, 1)  # [Hq, n, D]
    v = v.repeat_interleave(hq // hkv, dim=1).transpose(0, 1)
    qf = q.float()[:, None, :]
    out = F.scaled_dot_product_attention(qf, k, v, scale=scale)[:, 0]
    lse = torch.logsumexp((qf @ k.transpose(1, 2))[:, 0] * scale, dim=-1)
    return out, lse


def _dense_batch(q, k_cache, v_cache, tables, lens, scale):
    outs, lses = zip(*[_dense(q[b], k_cache, v_cache, tables[b].tolist(), n, scale) for b, n in enumerate(lens)])
    return torch.stack(outs), torch.stack(lses)


def _close(a, b, tol):
    assert not torch.isnan(a.float()).any(), "NaN in output (an element was not written?)"
    torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("bs", [4, 16])
def test_ref_matches_dense(hq, hkv, bs):
    g = torch.Generator().manual_seed(hq * 10 + hkv + bs)
    d, lens = 32, [37, 1, 0, 16, 5]
    k_cache, v_cache = _cache(40, bs, hkv, d, torch.float32, g)
    tables = _tables(lens, bs, 12, 40, g)
    q = torch.randn(len(lens), hq, d, generator=g)
    out, lse = ref.paged_decode(q, k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32), 0.2,
                                return_lse=True)
    want_out, want_lse = _dense_batch(q, k_cache, v_cache, tables, lens, 0.2)
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)
    assert torch.all(lse[2] == -math.inf) and torch.all(out[2] == 0)


def test_merge_of_split_halves_is_whole():
    g = torch.Generator().manual_seed(3)
    bs, hkv, hq, d = 4, 2, 8, 16
    k_cache, v_cache = _cache(30, bs, hkv, d, torch.float32, g)
    lens = [24, 8, 12]
    tables = _tables(lens, bs, 6, 30, g)
    q = torch.randn(3, hq, d, generator=g)
    whole_o, whole_l = ref.paged_decode(q, k_cache, v_cache, tables, torch.tensor(lens), 0.3, return_lse=True)
    # First half of each row's blocks vs the rest, as two independent key sets.
    half = [n // bs // 2 for n in lens]
    t1 = torch.stack([torch.cat([tables[b, :h], tables[b, h:].new_full((6 - h,), -1)]) for b, h in enumerate(half)])
    t2 = torch.stack([torch.cat([tables[b, h:], tables[b, :h].new_full((h,), -1)]) for b, h in enumerate(half)])
    l1 = torch.tensor([h * bs for h in half])
    o1, s1 = ref.paged_decode(q, k_cache, v_cache, t1, l1, 0.3, return_lse=True)
    o2, s2 = ref.paged_decode(q, k_cache, v_cache, t2, torch.tensor(lens) - l1, 0.3, return_lse=True)
    for merge in (ref.merge_attn_states, pd.merge_attn_states):
        o, l = merge(o1, s1, o2, s2)
        torch.testing.assert_close(o, whole_o, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(l, whole_l, atol=1e-5, rtol=1e-5)


def test_merge_with_empty_part():
    o = torch.randn(2, 3, 8)
    lse = torch.randn(2, 3)
    empty_o, empty_l = torch.zeros(2, 3, 8), torch.full((2, 3), -math.inf)
    m_o, m_l = ref.merge_attn_states(o, lse, empty_o, empty_l)
    assert torch.equal(m_o, o) and torch.equal(m_l, lse)
    m_o, m_l = ref.merge_attn_states(empty_o, empty_l, o, lse)
    assert torch.equal(m_o, o) and torch.equal(m_l, lse)
    m_o, m_l = ref.merge_attn_states(empty_o, empty_l, empty_o, empty_l)
    assert torch.equal(m_o, empty_o) and torch.all(m_l == -math.inf)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_triton_decode_matches_ref(dtype, hq, hkv, num_splits, poison):
    g = torch.Generator().manual_seed(hq + hkv * 7 + (num_splits or 0))
    bs, d, lens = 4, 32, [37, 1, 0, 16, 70]
    k_cache, v_cache = _cache(50, bs, hkv, d, dtype, g)
    tables = _tables(lens, bs, 20, 50, g)
    q = torch.randn(len(lens), hq, d, generator=g).to(dtype)
    sl = torch.tensor(lens, dtype=torch.int32)
    want_o, want_l = ref.paged_decode(q, k_cache, v_cache, tables, sl, 0.25, return_lse=True)
    out, lse = pd.paged_decode(q, k_cache, v_cache, tables, sl, 0.25, return_lse=True, num_splits=num_splits)
    assert out.dtype == dtype and lse.dtype == torch.float32
    _close(out, want_o, TOL[dtype])
    torch.testing.assert_close(lse, want_l, atol=1e-4, rtol=1e-4)


def test_triton_decode_block_size_larger_than_tile(poison):
    g = torch.Generator().manual_seed(11)
    bs, d, lens = 32, 16, [33, 64, 5]
    k_cache, v_cache = _cache(12, bs, 2, d, torch.float32, g)
    tables = _tables(lens, bs, 3, 12, g)
    q = torch.randn(3, 4, d, generator=g)
    sl = torch.tensor(lens, dtype=torch.int32)
    _close(pd.paged_decode(q, k_cache, v_cache, tables, sl, 0.3), ref.paged_decode(q, k_cache, v_cache, tables,
                                                                                   sl, 0.3), 2e-5)


def _cascade_case(g, dtype, hq, hkv, bs=4, d=32):
    """3 groups (one with an empty prefix, one with a single row), 7 rows in shuffled group order."""
    n_blocks = 80
    k_cache, v_cache = _cache(n_blocks, bs, hkv, d, dtype, g)
    prefix_lens = [24, 0, 8]
    seq_group = [2, 0, 0, 1, 0, 2, 0]
    suffix_lens = [5, 1, 16, 0, 9, 3, 2]
    perm = torch.randperm(n_blocks, generator=g).tolist()
    prefix_tables, full_rows = [], []
    for n in prefix_lens:
        blocks, perm = perm[:n // bs], perm[n // bs:]
        prefix_tables.append(blocks + [-1] * (6 - len(blocks)))
    suffix_tables = []
    for b, n in enumerate(suffix_lens):
        blocks, perm = perm[:-(-n // bs)], perm[-(-n // bs):]
        suffix_tables.append(blocks + [0] * (5 - len(blocks)))
        pre = prefix_tables[seq_group[b]][:prefix_lens[seq_group[b]] // bs]
        full_rows.append(pre + blocks + [-1] * (11 - len(pre) - len(blocks)))
    t = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    q = torch.randn(len(seq_group), hq, d, generator=g).to(dtype)
    args = (q, k_cache, v_cache, t(prefix_tables), t(prefix_lens), t(seq_group), t(suffix_tables), t(suffix_lens))
    full_lens = [prefix_lens[seq_group[b]] + n for b, n in enumerate(suffix_lens)]
    return args, t(full_rows), t(full_lens)


@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (8, 1)])
def test_cascade_ref_equals_full_decode(hq, hkv):
    g = torch.Generator().manual_seed(hq * 3 + hkv)
    args, full_tables, full_lens = _cascade_case(g, torch.float32, hq, hkv)
    q, k_cache, v_cache = args[:3]
    want, _ = _dense_batch(q, k_cache, v_cache, full_tables, full_lens.tolist(), 0.3)
    torch.testing.assert_close(ref.cascade_decode(*args, 0.3), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("num_splits", [None, 2])
def test_triton_cascade_matches_ref(dtype, hq, hkv, num_splits, poison):
    g = torch.Generator().manual_seed(hq * 5 + hkv + (num_splits or 0))
    args, _, _ = _cascade_case(g, dtype, hq, hkv)
    want = ref.cascade_decode(*args, 0.3)
    seq_group = args[5]
    plan = pd.cascade_plan(seq_group, 3) if num_splits else None
    _close(pd.cascade_decode(*args, 0.3, plan=plan, num_splits=num_splits), want, TOL[dtype])


def test_cascade_ref_rejects_unaligned_prefix():
    g = torch.Generator().manual_seed(0)
    args, _, _ = _cascade_case(g, torch.float32, 4, 4)
    bad = list(args)
    bad[4] = torch.tensor([24, 0, 7], dtype=torch.int32)
    with pytest.raises(ValueError, match="multiples of block_size"):
        ref.cascade_decode(*bad, 0.3)


def test_decode_rejects_bad_heads():
    k_cache = torch.zeros(4, 4, 3, 16)
    with pytest.raises(ValueError, match="not a multiple"):
        pd.paged_decode(torch.zeros(1, 4, 16), k_cache, k_cache, torch.zeros(1, 1, dtype=torch.int32),
                        torch.ones(1, dtype=torch.int32), 1.0)

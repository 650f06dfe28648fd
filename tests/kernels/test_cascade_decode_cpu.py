"""The C++ CPU cascade decode (AVX-512 and portable paths) against paged_decode_ref.cascade_decode, which is
itself checked against dense attention in test_paged_decode.py."""
from pathlib import Path

import pytest
import torch

import step3vl_native
from step3vl_kernels import paged_decode_ref as ref
from step3vl_kernels.cascade_decode_cpu import cascade_decode_cpu, cpu_cascade_plan

PATHS = [pytest.param(True, id="avx512"), pytest.param(False, id="portable")]


def _case(g, *, batch, groups, hq, hkv, d, bs, prefix_blocks, suffix_lens, dtype):
    """Distinct blocks for every prefix and suffix (like the allocator), tables padded with -1."""
    n_prefix = sum(prefix_blocks)
    suffix_w = max(1, max(-(-n // bs) for n in suffix_lens))
    n_blocks = n_prefix + batch * suffix_w + 3
    k = torch.randn(n_blocks, bs, hkv, d, generator=g).to(dtype)
    v = torch.randn(n_blocks, bs, hkv, d, generator=g).to(dtype)
    perm = torch.randperm(n_blocks, generator=g).tolist()
    pw = max(1, max(prefix_blocks))
    pt = torch.full((groups, pw), -1, dtype=torch.int32)
    for i, nb in enumerate(prefix_blocks):
        pt[i, :nb] = torch.tensor(perm[:nb], dtype=torch.int32)
        perm = perm[nb:]
    st = torch.full((batch, suffix_w), -1, dtype=torch.int32)
    for b, n in enumerate(suffix_lens):
        nb = -(-n // bs)
        st[b, :nb] = torch.tensor(perm[:nb], dtype=torch.int32)
        perm = perm[nb:]
    q = torch.randn(batch, hq, d, generator=g)
    pl = torch.tensor([nb * bs for nb in prefix_blocks], dtype=torch.int32)
    sg = torch.arange(batch, dtype=torch.int32) % groups
    sl = torch.tensor(suffix_lens, dtype=torch.int32)
    return q, k, v, pt, pl, sg, st, sl


CASES = {
    # name: (batch, groups, hq, hkv, d, bs, prefix_blocks, suffix_lens)
    "pacore-shaped": (16, 1, 12, 4, 64, 16, [9], [1, 17, 40, 64, 65, 100, 3, 16, 15, 33, 80, 70, 2, 5, 128, 9]),
    "gqa1-several-groups": (5, 3, 4, 4, 32, 16, [2, 0, 5], [7, 1, 30, 16, 0]),
    "gqa8-head128": (3, 2, 16, 2, 128, 16, [3, 1], [20, 1, 64]),
    "tiny-preset": (4, 2, 4, 2, 16, 16, [1, 2], [3, 0, 18, 1]),
    "block8-odd-gqa": (6, 2, 6, 2, 48, 8, [4, 3], [9, 8, 1, 23, 0, 16]),
    "block32-many-rows": (40, 3, 8, 2, 64, 32, [2, 1, 3], [(7 * i) % 70 for i in range(40)]),
    "no-prefix": (3, 1, 8, 4, 64, 16, [0], [5, 1, 70]),
    "head-dim-not-16": (3, 2, 4, 2, 24, 16, [1, 2], [5, 17, 2]),
    "long-prefix-and-suffixes": (3, 1, 8, 2, 32, 16, [45], [700, 1, 257]),  # several 256-token chunks each
}


@pytest.mark.parametrize("simd", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name, dtype, simd, poison):
    batch, groups, hq, hkv, d, bs, pb, sl = CASES[name]
    g = torch.Generator().manual_seed(len(name) * 31 + d)
    q, k, v, pt, pl, sg, st, sl = _case(g, batch=batch, groups=groups, hq=hq, hkv=hkv, d=d, bs=bs,
                                        prefix_blocks=pb, suffix_lens=sl, dtype=dtype)
    want = ref.cascade_decode(q, k, v, pt, pl, sg, st, sl, d ** -0.5)
    got = cascade_decode_cpu(q, k, v, pt, pl, sg, st, sl, d ** -0.5, simd=simd)
    assert not torch.isnan(got).any(), "an output element was not written"
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_plan_reuse_and_q_dtype():
    g = torch.Generator().manual_seed(1)
    q, k, v, pt, pl, sg, st, sl = _case(g, batch=4, groups=2, hq=8, hkv=2, d=64, bs=16, prefix_blocks=[2, 1],
                                        suffix_lens=[3, 20, 1, 7], dtype=torch.float32)
    plan = cpu_cascade_plan(sg, 2)
    a = cascade_decode_cpu(q, k, v, pt, pl, sg, st, sl, 0.125, plan=plan)
    b = cascade_decode_cpu(q, k, v, pt, pl, sg, st, sl, 0.125)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    out = cascade_decode_cpu(q.bfloat16(), k, v, pt, pl, sg, st, sl, 0.125, plan=plan)
    assert out.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="plan is for 3 groups"):
        cascade_decode_cpu(q, k, v, pt, pl, sg, st, sl, 0.125, plan=cpu_cascade_plan(sg, 3))


def test_bad_metadata_is_a_clear_error():
    g = torch.Generator().manual_seed(2)
    q, k, v, pt, pl, sg, st, sl = _case(g, batch=2, groups=1, hq=4, hkv=2, d=16, bs=16, prefix_blocks=[1],
                                        suffix_lens=[3, 4], dtype=torch.float32)
    bad = st.clone()
    bad[1, 0] = k.shape[0] + 5
    with pytest.raises(ValueError, match=r"suffix_block_tables row 1 entry 0: block \d+ outside the pool"):
        cascade_decode_cpu(q, k, v, pt, pl, sg, bad, sl, 0.125)
    with pytest.raises(ValueError, match="length 40 does not fit"):
        cascade_decode_cpu(q, k, v, pt, pl, sg, st, torch.tensor([3, 40], dtype=torch.int32), 0.125)
    with pytest.raises(ValueError, match="fp32 or bf16"):
        cascade_decode_cpu(q, k.half(), v.half(), pt, pl, sg, st, sl, 0.125)


def test_avx512_is_detected_consistently():
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo on this platform to compare with")
    # Never claims a feature the CPU lacks; a portable build (-DSTEP3VL_FORCE_PORTABLE) claims none.
    want = step3vl_native.cpu_simd_compiled() and " avx512f" in cpuinfo.read_text()
    assert step3vl_native.cpu_has_avx512() == want


def test_a_row_does_not_depend_on_its_batch():
    """Seeded sampling must not change with batch composition: the same row alone or among others, bit for bit."""
    g = torch.Generator().manual_seed(9)
    q, k, v, pt, pl, sg, st, sl = _case(g, batch=6, groups=2, hq=8, hkv=2, d=64, bs=16, prefix_blocks=[20, 3],
                                        suffix_lens=[300, 5, 1, 70, 260, 9], dtype=torch.float32)
    full = cascade_decode_cpu(q, k, v, pt, pl, sg, st, sl, 0.125)
    for b in range(6):
        one = cascade_decode_cpu(q[b:b + 1], k, v, pt[sg[b]:sg[b] + 1], pl[sg[b]:sg[b] + 1],
                                 torch.zeros(1, dtype=torch.int32), st[b:b + 1], sl[b:b + 1], 0.125)
        assert torch.equal(one[0], full[b]), f"row {b} changed with its batch"

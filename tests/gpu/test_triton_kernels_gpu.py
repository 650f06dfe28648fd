"""Every Triton kernel (and the CUDA paged decode when built) against its reference on the GPU, in bf16 at
the model's shapes: 32 q / 8 kv heads at head_dim 128 with 4K contexts, vision 16 heads x 96 x 2704 tokens."""
import importlib

import pytest
import torch

from step3vl_kernels import kv_write, kv_write_ref, paged_decode, paged_decode_ref, paged_prefill
from step3vl_kernels import paged_prefill_ref, sampling, sampling_ref, vision_attention, vision_attention_ref

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

HQ, HKV, D, BS = 32, 8, 128, 16
BF16_TOL = dict(atol=2e-2, rtol=2e-2)


def _gen(seed):
    return torch.Generator(device="cuda").manual_seed(seed)


def _caches(n_blocks, dtype=torch.bfloat16, seed=0):
    g = _gen(seed)
    return tuple(torch.randn(n_blocks, BS, HKV, D, generator=g, device="cuda").to(dtype) for _ in range(2))


def _tables(lens, width, n_blocks, seed=1):
    perm = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
    rows = []
    for n in lens:
        need = -(-n // BS)
        rows.append(perm[:need] + [0] * (width - need))
        perm = perm[need:]
    return torch.tensor(rows, dtype=torch.int32, device="cuda")


def _nan_free_close(got, want, **tol):
    assert not torch.isnan(got.float()).any()
    torch.testing.assert_close(got.float(), want.float(), **tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_paged_decode(dtype):
    lens = [4096, 4000, 1, 17, 2048, 3333, 4095, 100] * 2
    k_cache, v_cache = _caches(4400, dtype)
    tables = _tables(lens, 256, 4400)
    q = torch.randn(len(lens), HQ, D, device="cuda", generator=_gen(2)).to(dtype)
    sl = torch.tensor(lens, dtype=torch.int32, device="cuda")
    want_o, want_l = paged_decode_ref.paged_decode(q, k_cache, v_cache, tables, sl, D ** -0.5, return_lse=True)
    for splits in (None, 1):
        out, lse = paged_decode.paged_decode(q, k_cache, v_cache, tables, sl, D ** -0.5, return_lse=True,
                                             num_splits=splits)
        _nan_free_close(out, want_o, **BF16_TOL)
        torch.testing.assert_close(lse, want_l, atol=2e-2, rtol=2e-3)


def test_cascade_decode():
    """Two groups of 8 trajectories over 4K-token prefixes, plus a single-row group with an empty prefix."""
    k_cache, v_cache = _caches(1200)
    perm = torch.randperm(1200, generator=torch.Generator().manual_seed(3)).tolist()
    prefix_lens = [4096, 2048, 0]
    prefix_tables = torch.zeros(3, 256, dtype=torch.int32)
    for g, n in enumerate(prefix_lens):
        prefix_tables[g, :n // BS] = torch.tensor(perm[:n // BS])
        perm = perm[n // BS:]
    seq_group = [0] * 8 + [1] * 8 + [2]
    suffix_lens = [1, 15, 16, 17, 200, 33, 64, 5] * 2 + [300]
    suffix_tables = torch.zeros(17, 32, dtype=torch.int32)
    for b, n in enumerate(suffix_lens):
        need = -(-n // BS)
        suffix_tables[b, :need] = torch.tensor(perm[:need])
        perm = perm[need:]
    cu = lambda x: torch.as_tensor(x, dtype=torch.int32).cuda()  # noqa: E731
    q = torch.randn(17, HQ, D, device="cuda", generator=_gen(4)).to(torch.bfloat16)
    order = torch.randperm(17, generator=torch.Generator().manual_seed(5))  # rows not sorted by group
    args = (q[order.cuda()], k_cache, v_cache, cu(prefix_tables), cu(prefix_lens), cu(seq_group)[order.cuda()],
            cu(suffix_tables)[order.cuda()], cu(suffix_lens)[order.cuda()], D ** -0.5)
    want = paged_decode_ref.cascade_decode(*args)
    _nan_free_close(paged_decode.cascade_decode(*args), want, **BF16_TOL)


def test_paged_prefill():
    # A fresh 1000-token prompt, a 517-token chunk after 3000 cached tokens, a 1-token extend.
    q_lens, seq_lens = [1000, 517, 1], [1000, 3517, 2049]
    k_cache, v_cache = _caches(500)
    tables = _tables(seq_lens, 224, 500)
    cu = torch.tensor([0, 1000, 1517, 1518], dtype=torch.int32, device="cuda")
    q = torch.randn(1518, HQ, D, device="cuda", generator=_gen(6)).to(torch.bfloat16)
    sl = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    want = paged_prefill_ref.paged_prefill(q, k_cache, v_cache, cu, sl, tables, D ** -0.5)
    _nan_free_close(paged_prefill.paged_prefill(q, k_cache, v_cache, cu, sl, tables, D ** -0.5), want, **BF16_TOL)


def test_vision_attention():
    h, d, views = 16, 96, 3
    lens = [2704] * views + [37]
    t = sum(lens)
    g = _gen(7)
    q, k, v = (torch.randn(t, h, d, device="cuda", generator=g).to(torch.bfloat16) for _ in range(3))
    angle = torch.rand(t, d // 2, device="cuda", generator=g) * 50
    cos, sin = angle.cos().repeat_interleave(2, -1), angle.sin().repeat_interleave(2, -1)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    want = vision_attention_ref.vision_attention(q, k, v, cu, cos, sin, d ** -0.5)
    _nan_free_close(vision_attention.vision_attention(q, k, v, cu, cos, sin, d ** -0.5), want, **BF16_TOL)


def test_kv_write():
    k_cache, v_cache = _caches(300)
    kr, vr = k_cache.clone(), v_cache.clone()
    g = _gen(8)
    k, v = (torch.randn(2000, HKV, D, device="cuda", generator=g).to(torch.bfloat16) for _ in range(2))
    slots = torch.randperm(300 * BS, device="cuda", generator=g)[:2000]
    slots[::7] = -1
    kv_write.write_kv(k, v, k_cache, v_cache, slots)
    kv_write_ref.write_kv(k, v, kr, vr, slots)
    assert torch.equal(k_cache, kr) and torch.equal(v_cache, vr)


def test_sampling_token_for_token():
    b, vocab = 32, 151936
    g = _gen(9)
    logits = (torch.randn(b, vocab, device="cuda", generator=g) * 4).to(torch.bfloat16)
    temperature = torch.rand(b, device="cuda", generator=g) * 1.5
    temperature[::8] = 0
    top_k = torch.randint(0, 100, (b,), device="cuda", generator=g, dtype=torch.int32)
    top_p = torch.where(torch.arange(b, device="cuda") % 2 == 0, 0.9, 1.0)
    min_p = torch.where(torch.arange(b, device="cuda") % 3 == 0, 0.05, 0.0)
    seeds = torch.randint(0, 2**62, (b,), device="cuda", generator=g)
    sample_index = torch.arange(b, device="cuda") % 4
    step = torch.randint(0, 10000, (b,), device="cuda", generator=g)
    args = (logits, temperature, top_k, top_p, min_p, seeds, sample_index, step)
    want = sampling_ref.sample(*args)
    assert torch.equal(sampling.sample(*args), want)
    # The CPU reference draws the same tokens as the GPU kernel.
    assert torch.equal(sampling_ref.sample(*(a.cpu() for a in args)), want.cpu())


def test_cuda_paged_decode():
    try:
        mod = importlib.import_module("step3vl_kernels.paged_decode_cuda")
    except ImportError as e:
        pytest.skip(f"step3vl_kernels.paged_decode_cuda not importable: {e}")
    lens = [4096, 1, 17, 3000]
    k_cache, v_cache = _caches(800)
    tables = _tables(lens, 256, 800)
    q = torch.randn(4, HQ, D, device="cuda", generator=_gen(10)).to(torch.bfloat16)
    sl = torch.tensor(lens, dtype=torch.int32, device="cuda")
    want = paged_decode_ref.paged_decode(q, k_cache, v_cache, tables, sl, D ** -0.5)
    _nan_free_close(mod.paged_decode_cuda(q, k_cache, v_cache, tables, sl, D ** -0.5), want, **BF16_TOL)

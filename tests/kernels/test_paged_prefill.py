"""Paged prefill / extend: reference against dense causal attention, Triton kernel against the reference."""
import pytest
import torch
import torch.nn.functional as F

from step3vl_kernels import paged_prefill as pp
from step3vl_kernels import paged_prefill_ref as ref

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _case(g, dtype, hq, hkv, q_lens, seq_lens, bs=4, d=32, n_blocks=64):
    k_cache = torch.randn(n_blocks, bs, hkv, d, generator=g).to(dtype)
    v_cache = torch.randn(n_blocks, bs, hkv, d, generator=g).to(dtype)
    perm = torch.randperm(n_blocks, generator=g).tolist()
    width = max(-(-n // bs) for n in seq_lens)
    rows = []
    for n in seq_lens:
        need = -(-n // bs)
        rows.append(perm[:need] + [0] * (width - need))
        perm = perm[need:]
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(int(cu[-1]), hq, d, generator=g).to(dtype)
    return q, k_cache, v_cache, cu, torch.tensor(seq_lens, dtype=torch.int32), torch.tensor(rows, dtype=torch.int32)


def _dense(q, k_cache, v_cache, cu, seq_lens, tables, scale):
    """Token-by-token K/V gather and SDPA with an explicit causal-with-offset mask."""
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    hq = q.shape[1]
    out = torch.zeros(q.shape)
    for b, n in enumerate(seq_lens.tolist()):
        a, e = cu[b].item(), cu[b + 1].item()
        if e == a:
            continue
        k = torch.stack([k_cache[tables[b, t // bs], t % bs] for t in range(n)]).float()
        v = torch.stack([v_cache[tables[b, t // bs], t % bs] for t in range(n)]).float()
        k = k.repeat_interleave(hq // hkv, 1).transpose(0, 1)
        v = v.repeat_interleave(hq // hkv, 1).transpose(0, 1)
        allowed = torch.tensor([[kp <= n - (e - a) + j for kp in range(n)] for j in range(e - a)])
        o = F.scaled_dot_product_attention(q[a:e].float().transpose(0, 1), k, v, attn_mask=allowed, scale=scale)
        out[a:e] = o.transpose(0, 1)
    return out


# Fresh prompts, a chunk after a cached prefix, one-token chunks, an empty chunk, lengths off the block size.
Q_LENS = [5, 1, 20, 0, 3, 9]
SEQ_LENS = [5, 9, 37, 4, 3, 30]


@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (8, 1)])
def test_ref_matches_dense(hq, hkv):
    g = torch.Generator().manual_seed(hq + hkv)
    args = _case(g, torch.float32, hq, hkv, Q_LENS, SEQ_LENS)
    torch.testing.assert_close(ref.paged_prefill(*args, 0.3), _dense(*args, 0.3), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (8, 1)])
def test_triton_matches_ref(dtype, hq, hkv, poison):
    g = torch.Generator().manual_seed(hq * 3 + hkv)
    args = _case(g, dtype, hq, hkv, Q_LENS, SEQ_LENS)
    want = ref.paged_prefill(*args, 0.3)
    got = pp.paged_prefill(*args, 0.3)
    assert not torch.isnan(got.float()).any()
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])


def test_triton_large_block_and_long_chunk(poison):
    g = torch.Generator().manual_seed(5)
    args = _case(g, torch.float32, 6, 2, [70, 2], [70, 50], bs=32, d=16, n_blocks=8)
    torch.testing.assert_close(pp.paged_prefill(*args, 0.5), ref.paged_prefill(*args, 0.5), atol=2e-5, rtol=2e-5)


def test_rejects_chunk_longer_than_sequence():
    g = torch.Generator().manual_seed(0)
    q, kc, vc, cu, sl, bt = _case(g, torch.float32, 2, 2, [3], [3])
    with pytest.raises(ValueError, match="new tokens"):
        ref.paged_prefill(q, kc, vc, cu, torch.tensor([2], dtype=torch.int32), bt, 1.0)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        pp.paged_prefill(q, kc, vc, cu[:1], sl, bt, 1.0)

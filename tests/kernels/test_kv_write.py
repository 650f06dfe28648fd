"""KV-cache write: the Triton kernel and the reference against a per-token loop."""
import pytest
import torch

from step3vl_kernels import kv_write, kv_write_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _expected(k, v, k_cache, v_cache, slots):
    kc, vc = k_cache.clone(), v_cache.clone()
    bs = kc.shape[1]
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            kc[s // bs, s % bs] = k[t]
            vc[s // bs, s % bs] = v[t]
    return kc, vc


@pytest.mark.parametrize("impl", [kv_write.write_kv, kv_write_ref.write_kv], ids=["triton", "ref"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hkv,d,bs", [(2, 96, 3), (1, 16, 16), (4, 40, 5)])
def test_write_kv(impl, dtype, hkv, d, bs):
    g = torch.Generator().manual_seed(hkv * 1000 + d)
    n_blocks, n_tok = 7, 9
    k_cache = torch.randn(n_blocks, bs, hkv, d, generator=g).to(dtype)
    v_cache = torch.randn(n_blocks, bs, hkv, d, generator=g).to(dtype)
    # k/v as strided views of a fused projection, like the model produces them.
    kv = torch.randn(n_tok, 2, hkv, d, generator=g).to(dtype)
    k, v = kv[:, 0], kv[:, 1]
    slots = torch.randperm(n_blocks * bs, generator=g)[:n_tok]
    slots[[1, 5]] = -1
    want_k, want_v = _expected(k, v, k_cache, v_cache, slots)
    impl(k, v, k_cache, v_cache, slots.to(torch.int32 if hkv == 2 else torch.int64))
    assert torch.equal(k_cache, want_k)
    assert torch.equal(v_cache, want_v)


def test_write_kv_rejects_bad_shapes():
    k = torch.zeros(3, 2, 8)
    cache = torch.zeros(4, 4, 2, 16)
    with pytest.raises(ValueError, match="cache rows"):
        kv_write.write_kv(k, k, cache, cache, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="slot_mapping"):
        kv_write_ref.write_kv(k, k, torch.zeros(4, 4, 2, 8), torch.zeros(4, 4, 2, 8), torch.zeros(2))

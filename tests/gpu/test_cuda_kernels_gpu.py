"""The CUDA kernels (csrc/cuda) on the device against their plain-PyTorch references, fp16 and bf16."""
import math

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

if torch.cuda.is_available():
    from step3vl_kernels import cuda_launch as cl
    from step3vl_kernels.block_copy import BlockCopier, copy_blocks
    from step3vl_kernels.block_copy_ref import copy_blocks_ref
    from step3vl_kernels.compaction import compact_messages
    from step3vl_kernels.compaction_ref import compact_messages_ref
    from step3vl_kernels.paged_decode_cuda import paged_decode_cuda

DEV = "cuda"


# ------------------------------------------------------------------------------------------------ block copy

def _pairs(num_blocks: int, n: int, gen: torch.Generator) -> tuple[list[int], list[int]]:
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    return perm[:n], perm[n : 2 * n]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_block_copy_all_layers_one_launch(dtype):
    gen = torch.Generator().manual_seed(0)
    caches = [torch.randn(96, 16, 8, 128, generator=gen).to(DEV, dtype) for _ in range(2 * 4)]
    expect = [c.clone() for c in caches]
    src, dst = _pairs(96, 40, gen)
    copier = BlockCopier(caches)
    assert copier.width == 16
    copier(src, dst)
    copy_blocks_ref(expect, src, dst)
    for got, want in zip(caches, expect):
        assert torch.equal(got, want)
    # indices already on the device, and a second batch on the same copier
    src2, dst2 = _pairs(96, 7, gen)
    copier(torch.tensor(src2, device=DEV), torch.tensor(dst2, device=DEV))
    copy_blocks_ref(expect, src2, dst2)
    for got, want in zip(caches, expect):
        assert torch.equal(got, want)


def test_block_copy_mixed_shapes_and_narrow_alignment():
    gen = torch.Generator().manual_seed(1)
    caches = [
        torch.randn(50, 16, 2, 64, generator=gen).to(DEV, torch.float16),
        torch.randint(-100, 100, (50, 3), generator=gen, dtype=torch.int8).to(DEV),  # 3 bytes per block
        torch.randn(50, 5, generator=gen).to(DEV),  # 20 bytes per block
    ]
    expect = [c.clone() for c in caches]
    src, dst = _pairs(50, 20, gen)
    copier = BlockCopier(caches)
    assert copier.width == 1
    copier(src, dst)
    copy_blocks_ref(expect, src, dst)
    for got, want in zip(caches, expect):
        assert torch.equal(got, want)


def test_block_copy_large_blocks_use_several_chunks():
    gen = torch.Generator().manual_seed(2)
    caches = [torch.randn(8, 64, 8, 256, generator=gen).to(DEV, torch.bfloat16) for _ in range(3)]  # 256 KiB
    expect = [c.clone() for c in caches]
    copier = BlockCopier(caches)
    assert copier.chunks > 1
    copy_blocks(caches, [0, 5, 7], [1, 2, 3])
    copy_blocks_ref(expect, [0, 5, 7], [1, 2, 3])
    for got, want in zip(caches, expect):
        assert torch.equal(got, want)


# ------------------------------------------------------------------------------------------------ compaction

def _random_rows(K: int, L: int, marker: list[int], gen: torch.Generator, vocab: int = 12):
    tokens = torch.randint(0, vocab, (K, L), generator=gen, dtype=torch.int32)
    lengths = torch.randint(0, L + 1, (K,), generator=gen, dtype=torch.int32)
    lengths[0] = L
    # plant marker spans at random places (some rows keep only accidental ones)
    for k in range(K):
        for _ in range(int(torch.randint(0, 3, (1,), generator=gen))):
            if L >= len(marker):
                p = int(torch.randint(0, L - len(marker) + 1, (1,), generator=gen))
                tokens[k, p : p + len(marker)] = torch.tensor(marker, dtype=torch.int32)
    return tokens, lengths


def _assert_same(got, want):
    assert torch.equal(got.offsets.cpu(), want.offsets.cpu())
    assert torch.equal(got.tokens.cpu(), want.tokens.cpu())
    assert torch.equal(got.closed.cpu(), want.closed.cpu())
    assert torch.equal(got.truncated.cpu(), want.truncated.cpu())


@pytest.mark.parametrize("K,L", [(1, 1), (1, 300), (16, 4096), (45, 129), (700, 64), (4096, 40)])
@pytest.mark.parametrize("marker", [[7], [7, 8], [3, 3, 3]])
def test_compaction_matches_ref(K, L, marker):
    gen = torch.Generator().manual_seed(K * 1000 + L + len(marker))
    tokens, lengths = _random_rows(K, L, marker, gen)
    for max_tokens in (0, 5, 512, 10**6):
        for keep_unclosed in (False, True):
            want = compact_messages_ref(tokens, lengths, marker, max_tokens, keep_unclosed)
            got = compact_messages(tokens.to(DEV), lengths.to(DEV), marker, max_tokens, keep_unclosed)
            _assert_same(got, want)


def test_compaction_realistic_round():
    """16 trajectories of up to 32K tokens, the `</think>` id near the end of most, one never closed."""
    gen = torch.Generator().manual_seed(5)
    K, L, think_end = 16, 32768, 151668
    tokens = torch.randint(0, 151000, (K, L), generator=gen, dtype=torch.int32)
    lengths = torch.randint(L // 2, L + 1, (K,), generator=gen, dtype=torch.int32)
    for k in range(1, K):
        tokens[k, int(lengths[k]) - 1 - k * 97] = think_end
    want = compact_messages_ref(tokens, lengths, [think_end], 1024, keep_unclosed=False)
    got = compact_messages(tokens.to(DEV), lengths.to(DEV), [think_end], 1024, keep_unclosed=False)
    _assert_same(got, want)
    assert not bool(got.closed[0]) and bool(got.closed[1:].all())


# ------------------------------------------------------------------------------------------------ paged decode

def _decode_ref(q, k_cache, v_cache, block_tables, seq_lens, scale):
    """Gather each sequence's keys through its block table, then plain fp32 softmax attention."""
    B, Hq, D = q.shape
    bs, Hkv = k_cache.shape[1], k_cache.shape[2]
    out = torch.zeros(B, Hq, D, dtype=torch.float32, device=q.device)
    lse = torch.full((B, Hq), -math.inf, dtype=torch.float32, device=q.device)
    for b in range(B):
        n = int(seq_lens[b])
        if n == 0:
            continue
        t = torch.arange(n, device=q.device)
        slots = block_tables[b, t // bs].long() * bs + t % bs
        k = k_cache.reshape(-1, Hkv, D)[slots].float().repeat_interleave(Hq // Hkv, dim=1)  # [n, Hq, D]
        v = v_cache.reshape(-1, Hkv, D)[slots].float().repeat_interleave(Hq // Hkv, dim=1)
        s = torch.einsum("hd,nhd->hn", q[b].float(), k) * scale
        lse[b] = torch.logsumexp(s, dim=-1)
        out[b] = torch.einsum("hn,nhd->hd", torch.softmax(s, dim=-1), v)
    return out, lse


def _decode_case(B, Hq, Hkv, D, bs, max_len, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, max_len + 1, (B,), generator=gen, dtype=torch.int32)
    lens[0] = max_len
    if B > 2:
        lens[1], lens[2] = 1, 0  # one-token and empty sequences
    M = -(-max_len // bs) + 1  # one spare column of padding
    num_blocks = B * M + 3
    perm = torch.randperm(num_blocks, generator=gen)[: B * M].view(B, M).to(torch.int32)
    used = (lens.long() + bs - 1) // bs
    tables = torch.where(torch.arange(M)[None, :] < used[:, None], perm, torch.full_like(perm, -1))
    q = torch.randn(B, Hq, D, generator=gen).to(DEV, dtype)
    k = torch.randn(num_blocks, bs, Hkv, D, generator=gen).to(DEV, dtype)
    v = torch.randn(num_blocks, bs, Hkv, D, generator=gen).to(DEV, dtype)
    return q, k, v, tables.to(DEV), lens.to(DEV)


DECODE_SHAPES = [  # B, Hq, Hkv, D, block_size, max_len
    (16, 32, 8, 128, 16, 4096),  # Qwen3-8B decode over a 4K context
    (4, 8, 8, 64, 16, 300),  # GQA ratio 1
    (5, 16, 4, 128, 32, 777),  # ratio 4
    (4, 12, 4, 64, 16, 100),  # ratio 3 (a partly used chunk)
    (3, 32, 2, 128, 16, 513),  # ratio 16 (two chunks per kv head)
    (3, 8, 1, 256, 8, 200),  # ratio 8, head_dim 256
    (3, 4, 2, 32, 16, 33),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", DECODE_SHAPES)
@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_paged_decode_matches_ref(dtype, shape, num_splits):
    B, Hq, Hkv, D, bs, max_len = shape
    q, k, v, tables, lens = _decode_case(B, Hq, Hkv, D, bs, max_len, dtype, seed=sum(shape))
    scale = D**-0.5
    out, lse = paged_decode_cuda(q, k, v, tables, lens, scale, return_lse=True, num_splits=num_splits)
    want, want_lse = _decode_ref(q, k, v, tables, lens, scale)
    atol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), want, atol=atol, rtol=1e-2)
    torch.testing.assert_close(lse, want_lse, atol=1e-3, rtol=1e-4)
    only_out = paged_decode_cuda(q, k, v, tables, lens, scale, num_splits=num_splits)
    assert torch.equal(only_out, out)


def test_paged_decode_rejects_bad_lengths():
    q, k, v, tables, lens = _decode_case(2, 4, 2, 64, 16, 40, torch.float16, seed=3)
    with pytest.raises(ValueError, match="seq_lens"):
        paged_decode_cuda(q, k, v, tables, lens + 1000, 0.1)
    bad = tables.clone()
    bad[0, 0] = k.shape[0]
    with pytest.raises(IndexError, match="block_tables"):
        paged_decode_cuda(q, k, v, bad, lens, 0.1)


# ------------------------------------------------------------------------------------------------ loading

@pytest.mark.parametrize("name,functions", [
    ("block_copy", ["block_copy_w16", "block_copy_w1"]),
    ("compaction", ["compact_messages"]),
    ("paged_decode", ["paged_decode_bf16_d128_g4", "paged_decode_f16_d64_g1", "paged_decode_merge_bf16"]),
])
def test_nvrtc_module_loads_on_this_device(name, functions, tmp_path, monkeypatch):
    monkeypatch.setenv("STEP3VL_CACHE_DIR", str(tmp_path))
    dev = torch.cuda.current_device()
    image, path = cl.cached_nvrtc_image(name, torch.cuda.get_device_capability(dev))
    assert path.is_relative_to(tmp_path) and path.read_bytes() == image
    assert cl.cached_nvrtc_image(name, torch.cuda.get_device_capability(dev)) == (image, path)  # from disk
    module = cl.CudaModule(image, dev, f"nvrtc:{path}")
    for f in functions:
        module.function(f)


def test_nvrtc_built_block_copy_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("STEP3VL_CACHE_DIR", str(tmp_path))
    dev = torch.cuda.current_device()
    image, path = cl.cached_nvrtc_image("block_copy", torch.cuda.get_device_capability(dev))
    module = cl.CudaModule(image, dev, f"nvrtc:{path}")
    cache = torch.arange(4 * 64, device=DEV, dtype=torch.float32).view(4, 64)
    bases = torch.tensor([cache.data_ptr()], device=DEV)
    sizes = torch.tensor([64 * 4], device=DEV)
    src, dst = torch.tensor([3], device=DEV), torch.tensor([0], device=DEV)
    cl.launch(module, "block_copy_w16", (1, 1, 1), (64,),
              [cl.ptr(bases), cl.ptr(sizes), cl.ptr(src), cl.ptr(dst), cl.i64(1024)])
    torch.cuda.synchronize()
    assert torch.equal(cache[0], cache[3]) and cache[0, 0] == 3 * 64


def test_kernels_run_on_a_side_stream():
    gen = torch.Generator().manual_seed(9)
    caches = [torch.randn(10, 256, generator=gen).to(DEV) for _ in range(2)]
    expect = [c.clone() for c in caches]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        copy_blocks(caches, [1, 2], [3, 4])
    torch.cuda.current_stream().wait_stream(side)
    copy_blocks_ref(expect, [1, 2], [3, 4])
    for got, want in zip(caches, expect):
        assert torch.equal(got, want)

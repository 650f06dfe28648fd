"""The CUDA kernels' index math (csrc/cuda/*.h) built for the host in step3vl_native.cuda_index, against the
Python references and plain formulas."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from step3vl_kernels.block_copy import vec_width
from step3vl_kernels.compaction_ref import compact_messages_ref
from step3vl_kernels.paged_decode_cuda import GROUP_CHUNKS, group_chunk, tokens_per_split

native = pytest.importorskip("step3vl_native", reason="step3vl_native is not built (pip install -e . builds it)")
ci = native.cuda_index


# ------------------------------------------------------------------------------------------------ compaction

@settings(max_examples=80, deadline=None)
@given(data=st.data(), K=st.integers(1, 40), L=st.integers(1, 40), m=st.integers(1, 3),
       max_tokens=st.integers(0, 45), keep_unclosed=st.booleans(), threads=st.sampled_from([1, 3, 32, 1024]))
def test_host_compaction_matches_ref(data, K, L, m, max_tokens, keep_unclosed, threads):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    tokens = rng.integers(1, 4, size=(K, L), dtype=np.int32)
    lengths = rng.integers(0, L + 1, size=K, dtype=np.int32)
    marker = rng.integers(1, 4, size=m, dtype=np.int32)
    got = ci.compact_messages_host(tokens, lengths, marker, max_tokens, keep_unclosed, threads)
    want = compact_messages_ref(torch.from_numpy(tokens), torch.from_numpy(lengths), torch.from_numpy(marker),
                                max_tokens, keep_unclosed)
    assert got[0].tolist() == want.tokens.tolist()
    assert got[1].tolist() == want.offsets.tolist()
    assert got[2].tolist() == want.closed.tolist()
    assert got[3].tolist() == want.truncated.tolist()


def test_last_marker_start_and_span_hand_cases():
    row = np.array([7, 8, 1, 7, 8, 7, 0], dtype=np.int32)
    assert ci.last_marker_start(row, 7, np.array([7, 8], dtype=np.int32)) == 3
    assert ci.last_marker_start(row, 4, np.array([7, 8], dtype=np.int32)) == 0  # span at 3 crosses the length
    assert ci.last_marker_start(row, 7, np.array([9], dtype=np.int32)) == -1
    assert ci.last_marker_start(row, 1, np.array([7, 8], dtype=np.int32)) == -1  # m > length
    # (start, len, closed, truncated)
    assert ci.message_span(3, 2, 10, 100, False) == (5, 5, True, False)
    assert ci.message_span(3, 2, 10, 4, False) == (5, 4, True, True)
    assert ci.message_span(8, 2, 10, 4, False) == (10, 0, True, False)
    assert ci.message_span(-1, 2, 10, 4, False) == (10, 0, False, False)
    assert ci.message_span(-1, 2, 10, 4, True) == (0, 4, False, True)


@pytest.mark.parametrize("n,threads", [(0, 4), (1, 1024), (5, 2), (1000, 1024), (4096, 1024), (37, 5)])
def test_thread_segments_partition_the_rows(n, threads):
    segs = [ci.thread_segment(n, t, threads) for t in range(threads)]
    covered = [k for b, e in segs for k in range(b, e)]
    assert covered == list(range(n))  # contiguous, in order, each row once


def test_host_compaction_rejects_bad_lengths():
    with pytest.raises(ValueError, match=r"lengths\[0\]"):
        ci.compact_messages_host(np.zeros((1, 3), np.int32), np.array([4], np.int32), np.array([1], np.int32), 5,
                                 False)


# ------------------------------------------------------------------------------------------------ block copy

@settings(max_examples=200, deadline=None)
@given(addresses=st.lists(st.integers(0, 2**48), min_size=1, max_size=4),
       sizes=st.lists(st.integers(0, 2**20), min_size=1, max_size=4))
def test_copy_vec_width_matches_python(addresses, sizes):
    bits = 0
    for v in addresses + sizes:
        bits |= v
    width = ci.copy_vec_width(bits)
    assert width == vec_width(addresses, sizes)
    assert all(v % width == 0 for v in addresses + sizes)


@pytest.mark.parametrize("nvec,per_chunk", [(0, 4), (1, 1024), (2048, 1024), (2049, 1024), (100, 7)])
def test_copy_chunks_partition_a_block(nvec, per_chunk):
    chunks = max(1, -(-nvec // per_chunk)) + 1  # one more chunk than needed must be empty
    covered = [v for c in range(chunks) for v in range(*ci.copy_chunk_range(nvec, c, per_chunk))]
    assert covered == list(range(nvec))
    assert ci.block_byte_offset(7, 4096) == 7 * 4096


# ------------------------------------------------------------------------------------------------ paged decode

def test_slot_mapping_matches_block_tables():
    g = torch.Generator().manual_seed(0)
    B, M, bs = 5, 6, 4
    tables = torch.randint(0, 50, (B, M), generator=g, dtype=torch.int32)
    lens = torch.tensor([0, 1, 4, 5, 24], dtype=torch.int32)
    got = ci.slot_mapping(tables.numpy(), lens.numpy(), bs)
    want = torch.cat([tables[b, torch.arange(n) // bs].long() * bs + torch.arange(n) % bs
                      for b, n in enumerate(lens.tolist())])
    assert got.tolist() == want.tolist()
    with pytest.raises(ValueError, match="more blocks"):
        ci.slot_mapping(tables.numpy(), np.array([0, 0, 0, 0, 25], np.int32), bs)


def test_kv_offset_matches_a_contiguous_cache():
    nb, bs, h, d = 3, 4, 5, 8
    cache = torch.arange(nb * bs * h * d).view(nb, bs, h, d)
    for blk, off, head in [(0, 0, 0), (2, 3, 4), (1, 2, 3)]:
        assert ci.kv_offset(blk * bs + off, head, h, d) == int(cache[blk, off, head, 0])


@pytest.mark.parametrize("max_context,splits,bs", [(4096, 4, 16), (4096, 5, 16), (1, 1, 16), (100, 3, 7),
                                                   (0, 2, 16), (16384, 64, 32)])
def test_splits_cover_the_context(max_context, splits, bs):
    per = ci.tokens_per_split(max_context, splits, bs)
    assert per == tokens_per_split(max_context, splits, bs) and per % bs == 0 and per > 0
    for seq_len in {0, 1, max_context // 2, max_context}:
        covered = [t for s in range(splits) for t in range(*ci.split_range(seq_len, s, per))]
        assert covered == list(range(seq_len))


@pytest.mark.parametrize("hq,hkv", [(32, 8), (8, 8), (12, 4), (32, 2), (4, 2), (24, 1)])
def test_q_head_chunks_cover_each_head_once(hq, hkv):
    group = hq // hkv
    size = group_chunk(group)
    assert size in GROUP_CHUNKS
    seen = []
    for kvh in range(hkv):
        for c in range(-(-group // size)):
            first, n = ci.chunk_first_q_head(kvh, group, c, size), ci.chunk_num_q_heads(group, c, size)
            assert 0 < n <= size
            heads = list(range(first, first + n))
            assert all(h // group == kvh for h in heads)  # the GQA rule: q head h reads kv head h // group
            seen += heads
    assert sorted(seen) == list(range(hq))

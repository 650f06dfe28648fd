"""Block copy (copy-on-write / pool compaction): the reference and the CPU dispatch against a per-pair loop."""
import pytest
import torch

from step3vl_kernels.block_copy import BlockCopier, copy_blocks, vec_width
from step3vl_kernels.block_copy_ref import copy_blocks_ref


def _caches(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(10, 4, 2, 8, generator=g),  # a [num_blocks, block_size, Hkv, D] layer
        torch.randn(10, 3, 5, generator=g).to(torch.bfloat16),
        torch.randint(-128, 127, (12, 7), generator=g, dtype=torch.int8),  # more blocks than the others
    ]


def _expected(caches, src, dst):
    out = [c.clone() for c in caches]
    for s, d in zip(src, dst):
        for o, c in zip(out, caches):
            o[d] = c[s]
    return out


@pytest.mark.parametrize("impl", [copy_blocks, copy_blocks_ref, lambda c, s, d: BlockCopier(c)(s, d)],
                         ids=["dispatch", "ref", "copier"])
def test_copies_every_pair_in_every_cache(impl):
    caches = _caches()
    src, dst = [0, 3, 9, 4], [5, 1, 2, 8]
    want = _expected(caches, src, dst)
    impl(caches, src, dst)
    for got, w in zip(caches, want):
        assert torch.equal(got, w)


@pytest.mark.parametrize("make", [list, lambda x: range(x[0], x[0] + 1), lambda x: torch.tensor(x, dtype=torch.int32),
                                  lambda x: torch.tensor(x)], ids=["list", "range", "int32", "int64"])
def test_index_forms(make):
    caches = _caches(1)
    want = _expected(caches, [7], [2])
    copy_blocks(caches, make([7]), make([2]))
    for got, w in zip(caches, want):
        assert torch.equal(got, w)


def test_no_pairs_is_a_no_op():
    caches = _caches(2)
    before = [c.clone() for c in caches]
    copy_blocks(caches, [], [])
    assert all(torch.equal(a, b) for a, b in zip(caches, before))


def test_copier_reused_across_calls():
    caches = _caches(3)
    copier = BlockCopier(caches)
    want = _expected(_expected(caches, [1], [0]), [4, 5], [6, 7])
    copier([1], [0])
    copier([4, 5], [6, 7])
    for got, w in zip(caches, want):
        assert torch.equal(got, w)


@pytest.mark.parametrize("src,dst,err,match", [
    ([10], [0], IndexError, r"src block ids must be in \[0, 10\)"),  # 10 blocks in the smallest cache
    ([0], [-1], IndexError, "dst block ids"),
    ([0, 1], [2, 2], ValueError, "distinct"),
    ([0, 1], [1, 2], ValueError, "also a src"),
    ([0, 1], [2], ValueError, "differ in length"),
    ([[0]], [[1]], ValueError, "1-D"),
])
def test_rejects_bad_pairs(src, dst, err, match):
    caches = _caches()
    before = [c.clone() for c in caches]
    with pytest.raises(err, match=match):
        copy_blocks(caches, src, dst)
    assert all(torch.equal(a, b) for a, b in zip(caches, before))


def test_rejects_bad_caches():
    with pytest.raises(ValueError, match="at least one cache"):
        copy_blocks([], [0], [1])
    with pytest.raises(ValueError, match="on meta"):
        copy_blocks([torch.zeros(4, 2), torch.zeros(4, 2, device="meta")], [0], [1])
    with pytest.raises(TypeError, match="integers"):
        copy_blocks([torch.zeros(4, 2)], torch.tensor([0.0]), torch.tensor([1.0]))


def test_vec_width_hand_cases():
    # widest of 16/8/4/2/1 bytes dividing every base address and bytes-per-block value
    assert vec_width([4096, 8192], [32768]) == 16
    assert vec_width([4096], [20]) == 4
    assert vec_width([4098], [32]) == 2
    assert vec_width([4096], [3]) == 1
    assert vec_width([4104], [64]) == 8

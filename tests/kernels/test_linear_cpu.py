"""The packed CPU linear (AVX-512 and portable paths) against fp32 F.linear, and the packing round trip."""
import pytest
import torch
import torch.nn.functional as F

from step3vl_kernels.linear_cpu import bf16_exact, linear_packed, linear_packed_ref, pack_weight, unpack_weight

PATHS = [pytest.param(True, id="avx512"), pytest.param(False, id="portable")]


@pytest.mark.parametrize("simd", PATHS)
@pytest.mark.parametrize("packed_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n,k", [(64, 48), (37, 40), (200, 96), (1, 16), (49, 33)])
@pytest.mark.parametrize("rows", [1, 2, 5, 12, 16, 29])
def test_matches_fp32_linear(n, k, rows, packed_dtype, simd, poison):
    g = torch.Generator().manual_seed(n * 100 + k + rows)
    w = torch.randn(n, k, generator=g)
    if packed_dtype == torch.bfloat16:
        w = w.bfloat16().float()  # what a bf16 checkpoint loaded in fp32 holds
    bias = torch.randn(n, generator=g)
    x = torch.randn(rows, k, generator=g)
    packed = pack_weight(w, packed_dtype)
    got = linear_packed(x, packed, n, bias, simd=simd)
    assert not torch.isnan(got).any(), "an output element was not written"
    torch.testing.assert_close(got, F.linear(x, w, bias), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(linear_packed(x, packed, n, simd=simd), linear_packed_ref(x, packed, n),
                               atol=1e-4, rtol=1e-5)


def test_leading_dims_and_dtype():
    w = torch.randn(40, 32).bfloat16().float()
    x = torch.randn(2, 3, 32)
    y = linear_packed(x, pack_weight(w, torch.bfloat16), 40)
    assert y.shape == (2, 3, 40)
    torch.testing.assert_close(y, x @ w.T, atol=1e-5, rtol=1e-5)


def test_packing_round_trip_and_exactness():
    w = torch.randn(50, 24)
    assert torch.equal(unpack_weight(pack_weight(w, torch.float32), 50), w)
    assert not bf16_exact(w)
    wb = w.bfloat16().float()
    assert bf16_exact(wb)
    assert torch.equal(unpack_weight(pack_weight(wb, torch.bfloat16), 50), wb)


def test_bad_inputs_are_clear_errors():
    packed = pack_weight(torch.randn(20, 8), torch.float32)
    with pytest.raises(ValueError, match="x has 9 input features, the weights 8"):
        linear_packed(torch.randn(3, 9), packed, 20)
    with pytest.raises(ValueError, match=r"must be \[ceil\(40/16\), K, 16\]"):
        linear_packed(torch.randn(3, 8), packed, 40)
    with pytest.raises(ValueError, match="bias must be a contiguous fp32"):
        linear_packed(torch.randn(3, 8), packed, 20, torch.randn(19))

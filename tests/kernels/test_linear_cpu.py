"""The packed CPU linear (AVX-512 and portable paths) against fp32 F.linear, and the packing round trip."""
import pytest
import torch
import torch.nn.functional as F

import step3vl_native
from step3vl_kernels.linear_cpu import bf16_exact, linear_packed, linear_packed_ref, pack_weight, unpack_weight

PATHS = [pytest.param(True, id="simd"), pytest.param(False, id="portable")]
AMX = pytest.mark.skipif(not step3vl_native.cpu_has_amx(), reason="this CPU has no AMX-BF16 (or no permission)")
PACKINGS = [pytest.param("fp32", id="fp32"), pytest.param("bf16", id="bf16"),
            pytest.param("bf16-amx", id="bf16-amx", marks=AMX)]


@pytest.mark.parametrize("simd", PATHS)
@pytest.mark.parametrize("packing", PACKINGS)
@pytest.mark.parametrize("n,k", [(64, 48), (37, 40), (200, 96), (1, 16), (49, 33), (40, 70)])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 12, 16, 29])
def test_matches_fp32_linear(n, k, rows, packing, simd, poison):
    g = torch.Generator().manual_seed(n * 100 + k + rows)
    w = torch.randn(n, k, generator=g)
    if packing != "fp32":
        w = w.bfloat16().float()  # what a bf16 checkpoint loaded in fp32 holds
    bias = torch.randn(n, generator=g)
    x = torch.randn(rows, k, generator=g)
    packed = pack_weight(w, torch.float32 if packing == "fp32" else torch.bfloat16, amx=packing == "bf16-amx")
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


@pytest.mark.parametrize("packing", PACKINGS)
def test_a_row_does_not_depend_on_its_batch(packing):
    """The engine's seeded-sampling promise: a sequence's logits are the same alone or beside others."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(70, 96, generator=g)
    if packing != "fp32":
        w = w.bfloat16().float()
    packed = pack_weight(w, torch.float32 if packing == "fp32" else torch.bfloat16, amx=packing == "bf16-amx")
    x = torch.randn(40, 96, generator=g)
    alone = linear_packed(x[:1], packed, 70)
    for rows in (2, 3, 16, 17, 40):
        assert torch.equal(linear_packed(x[:rows], packed, 70)[:1], alone), f"row 0 changed in a batch of {rows}"


@AMX
def test_amx_is_fp32_accurate():
    """The three-term split keeps the AMX product as close to the exact (float64) result as fp32 FMAs get."""
    g = torch.Generator().manual_seed(11)
    w = (torch.randn(300, 2048, generator=g) * 0.02).bfloat16().float()
    x = torch.randn(16, 2048, generator=g) * 4
    exact = x.double() @ w.double().T
    amx = linear_packed(x, pack_weight(w, torch.bfloat16, amx=True), 300).double()
    fp32 = (x @ w.T).double()
    assert (amx - exact).abs().max() <= 4 * (fp32 - exact).abs().max()
    one_term = (x.bfloat16().float() @ w.T).double()  # what plain bf16 activations would give
    assert (amx - exact).abs().max() < (one_term - exact).abs().max() / 100


def test_packing_round_trip_and_exactness():
    w = torch.randn(50, 24)
    assert torch.equal(unpack_weight(pack_weight(w, torch.float32), 50), w)
    assert not bf16_exact(w)
    wb = w.bfloat16().float()
    assert bf16_exact(wb)
    assert torch.equal(unpack_weight(pack_weight(wb, torch.bfloat16), 50), wb)
    assert torch.equal(unpack_weight(pack_weight(wb, torch.bfloat16, amx=True), 50, 24), wb)


def test_bad_inputs_are_clear_errors():
    packed = pack_weight(torch.randn(20, 8), torch.float32)
    with pytest.raises(ValueError, match="x has 9 input features, the weights 8"):
        linear_packed(torch.randn(3, 9), packed, 20)
    with pytest.raises(ValueError, match=r"must come from pack_weight for 40 outputs"):
        linear_packed(torch.randn(3, 8), packed, 40)
    bad_amx = torch.zeros(2, 5, 16, 2, dtype=torch.bfloat16)  # K not padded to 32
    with pytest.raises(ValueError, match="must come from pack_weight"):
        linear_packed(torch.randn(3, 10), bad_amx, 20)
    with pytest.raises(ValueError, match="bias must be a contiguous fp32"):
        linear_packed(torch.randn(3, 8), packed, 20, torch.randn(19))

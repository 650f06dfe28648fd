"""The decoder's native small ops against their PyTorch references (and transformers-style formulas)."""
import pytest
import torch
import torch.nn.functional as F

from step3vl.model.rope import apply_rotate_half, rope_cos_sin, rope_inv_freq
from step3vl_kernels import decoder_ops_cpu as ops


@pytest.mark.parametrize("shape", [(1, 16), (5, 768), (3, 7, 64), (2, 33)])
def test_rms_norm(shape):
    g = torch.Generator().manual_seed(shape[-1])
    x = torch.randn(*shape, generator=g) * 3
    w = torch.randn(shape[-1], generator=g)
    want = w * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-6), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ops.rms_norm_ref(x, w, 1e-6), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("t,heads,d", [(1, 1, 16), (5, 12, 64), (3, 4, 128), (2, 3, 10)])
def test_rope_matches_model_rotary(t, heads, d):
    g = torch.Generator().manual_seed(t * heads + d)
    x = torch.randn(t, heads, d, generator=g)
    cos, sin = rope_cos_sin(torch.randint(0, 5000, (t,), generator=g), rope_inv_freq(d, 1e6))
    want = apply_rotate_half(x, cos, sin)
    got = ops.rope_rotate_half_(x.clone(), cos, sin)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ops.rope_rotate_half_ref(x, cos, sin), want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("shape", [(1, 5), (16, 2048), (3, 17)])
def test_silu_mul(shape):
    g = torch.Generator().manual_seed(shape[-1])
    gate = torch.randn(*shape, generator=g) * 6
    gate.view(-1)[0] = -100.0  # exp overflow side: silu -> -0
    gate.view(-1)[-1] = 100.0
    up = torch.randn(*shape, generator=g)
    torch.testing.assert_close(ops.silu_mul(gate, up), F.silu(gate) * up, atol=1e-5, rtol=1e-5)


def test_bad_inputs():
    with pytest.raises(ValueError, match="contiguous fp32"):
        ops.rms_norm(torch.randn(3, 4).double(), torch.randn(4), 1e-6)
    with pytest.raises(ValueError, match="weight shape"):
        ops.rms_norm(torch.randn(3, 4), torch.randn(5), 1e-6)
    with pytest.raises(ValueError, match="needs cos/sin"):
        ops.rope_rotate_half_(torch.randn(2, 3, 8), torch.randn(2, 6), torch.randn(2, 6))

"""Vision attention: reference against a complex-number RoPE + written-out softmax, Triton against the reference."""
import pytest
import torch

from step3vl_kernels import vision_attention as va
from step3vl_kernels import vision_attention_ref as ref

TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}


def _case(g, dtype, lens, h, d):
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    t = int(cu[-1])
    q, k, v = (torch.randn(t, h, d, generator=g).to(dtype) for _ in range(3))
    angle = torch.randn(t, d // 2, generator=g) * 3
    cos = angle.cos().repeat_interleave(2, dim=-1)
    sin = angle.sin().repeat_interleave(2, dim=-1)
    return q, k, v, cu, cos, sin


def _dense(q, k, v, cu, cos, sin, scale):
    """Adjacent pairs as complex numbers times e^{i angle}, then softmax(q k^T) v per view."""
    rot = torch.polar(torch.ones_like(cos[:, 0::2]), torch.atan2(sin[:, 0::2], cos[:, 0::2]))[:, None, :]

    def rope(x):
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2).contiguous())
        return torch.view_as_real(xc * rot).reshape(x.shape)

    qr, kr = rope(q), rope(k)
    out = torch.zeros(q.shape)
    for a, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        s = torch.einsum("qhd,khd->hqk", qr[a:e], kr[a:e]) * scale
        out[a:e] = torch.einsum("hqk,khd->qhd", torch.softmax(s, dim=-1), v[a:e].float())
    return out


LENS = [37, 1, 64, 0, 20]


@pytest.mark.parametrize("d", [96, 64, 16])
def test_ref_matches_dense(d):
    g = torch.Generator().manual_seed(d)
    args = _case(g, torch.float32, LENS, 3, d)
    torch.testing.assert_close(ref.vision_attention(*args, d ** -0.5), _dense(*args, d ** -0.5),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [96, 64, 40])
def test_triton_matches_ref(dtype, d, poison):
    g = torch.Generator().manual_seed(d + 1)
    args = _case(g, dtype, LENS, 2, d)
    want = ref.vision_attention(*args, d ** -0.5)
    got = va.vision_attention(*args, d ** -0.5)
    assert got.dtype == dtype and not torch.isnan(got.float()).any()
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])


def test_triton_strided_qkv(poison):
    """q, k, v as views of one fused [T, 3, H, D] projection."""
    g = torch.Generator().manual_seed(7)
    q, _, _, cu, cos, sin = _case(g, torch.float32, [33, 17], 2, 96)
    qkv = torch.randn(q.shape[0], 3, 2, 96, generator=g)
    q, k, v = qkv.unbind(1)
    torch.testing.assert_close(va.vision_attention(q, k, v, cu, cos, sin, 0.1),
                               ref.vision_attention(q, k, v, cu, cos, sin, 0.1), atol=2e-5, rtol=2e-5)


def test_rejects_bad_rope_shape():
    q = torch.zeros(4, 2, 8)
    with pytest.raises(ValueError, match="cos/sin"):
        va.vision_attention(q, q, q, torch.tensor([0, 4], dtype=torch.int32), torch.zeros(4, 4), torch.zeros(4, 4), 1.0)

"""The CPU sampler's native uniforms against the reference hash (bit-identical), and whole draws against
sampling_ref.sample for every filter combination."""
import pytest
import torch

from step3vl_kernels import sampling_cpu, sampling_ref


@pytest.mark.parametrize("vocab", [1, 17, 8192, 151936])
def test_uniforms_bit_identical(vocab):
    g = torch.Generator().manual_seed(vocab)
    seeds = torch.randint(0, 2**62, (5,), generator=g)
    key = sampling_ref.stream_key(seeds, torch.arange(5), torch.randint(0, 10**6, (5,), generator=g))
    want = sampling_ref.uniforms(key, vocab)
    got = sampling_cpu.uniforms(key, vocab)
    assert got.dtype == torch.float64 and torch.equal(got, want)
    assert bool(((got > 0) & (got < 1)).all())


def test_stream_keys_equal_reference():
    g = torch.Generator().manual_seed(5)
    seeds = torch.randint(-2**62, 2**62, (50,), generator=g)
    idx, step = torch.randint(0, 64, (50,), generator=g), torch.randint(0, 10**6, (50,), generator=g)
    assert torch.equal(sampling_cpu.stream_key(seeds, idx, step), sampling_ref.stream_key(seeds, idx, step))


def test_stream_keys_broadcast_scalars_like_reference():
    seeds = torch.tensor([1, 2**40, -5, 7])
    assert torch.equal(sampling_cpu.stream_key(seeds, torch.tensor(3), torch.tensor(9)),
                       sampling_ref.stream_key(seeds, torch.tensor(3), torch.tensor(9)))


def test_uniforms_by_hand():
    # One value computed with Python ints from the definition (lowbias32 finalizer).
    def mix(x):
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    key, tok = 0xDEADBEEF, 1234
    h = mix(key ^ mix((tok + 0x632BE5AB) & 0xFFFFFFFF))
    u = sampling_cpu.uniforms(torch.tensor([key]), 2000)[0, tok].item()
    assert u == ((h >> 8) + 0.5) * 2.0**-24


@pytest.mark.parametrize("filters", ["none", "top_k", "top_p", "min_p", "all"])
def test_draws_equal_reference(filters):
    g = torch.Generator().manual_seed(3)
    b, v = 12, 3000
    logits = torch.randn(b, v, generator=g) * 3
    temperature = torch.rand(b, generator=g) + 0.3
    temperature[0] = 0.0  # a greedy row in the batch
    top_k = torch.full((b,), 50 if filters in ("top_k", "all") else 0, dtype=torch.int32)
    top_p = torch.full((b,), 0.8 if filters in ("top_p", "all") else 1.0)
    min_p = torch.full((b,), 0.05 if filters in ("min_p", "all") else 0.0)
    seeds = torch.randint(0, 2**40, (b,), generator=g)
    args = (logits, temperature, top_k, top_p, min_p, seeds, torch.arange(b), torch.full((b,), 9))
    assert torch.equal(sampling_cpu.sample(*args), sampling_ref.sample(*args))

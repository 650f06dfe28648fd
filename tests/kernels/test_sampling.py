"""Sampling: the counter-based stream against the spec written in plain Python, the filters on hand-computed
cases, Gumbel-max frequencies against softmax, batch-position independence, Triton == reference."""
import pytest
import torch

from step3vl_kernels import sampling as sk
from step3vl_kernels import sampling_ref as ref

M32 = 0xFFFFFFFF


def _mix32(x):
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def _key(seed, sample, step):
    h = _mix32((seed & M32) ^ 0x9E3779B9)
    h = _mix32(h ^ ((seed >> 32) & M32))
    h = _mix32(h ^ (sample & M32))
    return _mix32(h ^ (step & M32))


def _uniform(key, token):
    return ((_mix32(key ^ _mix32((token + 0x632BE5AB) & M32)) >> 8) + 0.5) * 2.0**-24


def _params(b, vocab, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seeds=None, sample=0, step=0):
    full = lambda x, dt: torch.full((b,), x, dtype=dt)  # noqa: E731
    seeds = torch.arange(b, dtype=torch.int64) if seeds is None else seeds
    return (full(temperature, torch.float32), full(top_k, torch.int32), full(top_p, torch.float32),
            full(min_p, torch.float32), seeds, full(sample, torch.int64), full(step, torch.int64))


def test_stream_matches_python_spec():
    seeds = [0, 1, 12345, 2**40 + 17, 2**63 - 1]
    samples, steps, tokens = [0, 3, 2**33 + 1], [0, 7, 100000], [0, 1, 151935]
    for seed in seeds:
        for s in samples:
            for st in steps:
                k = ref.stream_key(torch.tensor(seed), torch.tensor(s), torch.tensor(st))
                assert int(k) == _key(seed, s, st)
                u = ref.uniform(k, torch.tensor(tokens))
                assert u.dtype == torch.float64
                assert u.tolist() == [_uniform(_key(seed, s, st), t) for t in tokens]


def test_uniform_is_in_open_interval_and_flat():
    u = ref.uniform(ref.stream_key(torch.tensor(3), torch.tensor(0), torch.tensor(0)), torch.arange(200000))
    assert 0.0 < u.min() and u.max() < 1.0
    hist = torch.histc(u.float(), bins=10, min=0.0, max=1.0)
    assert (hist - 20000).abs().max() < 800  # ~5.6 sigma of a binomial(200000, 0.1)


def test_greedy_rows_take_first_argmax():
    logits = torch.tensor([[0.0, 2.0, 2.0, 1.0], [5.0, -1.0, 5.0, 0.0], [0.1, 0.2, 0.3, 0.4]])
    params = _params(3, 4, temperature=0.0)
    for impl in (ref.sample, sk.sample):
        assert impl(logits, *params).tolist() == [1, 0, 3]


@pytest.mark.parametrize("impl", [ref.sample, sk.sample], ids=["ref", "triton"])
def test_top_k_one_is_argmax(impl):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 300, generator=g) * 4
    params = _params(16, 300, temperature=1.7, top_k=1, seeds=torch.randint(0, 2**40, (16,), generator=g))
    assert torch.equal(impl(logits, *params), logits.argmax(dim=-1))


def _kept(logits, **kw):
    z, _ = ref.scaled_logits(logits, torch.ones(logits.shape[0]))
    b = logits.shape[0]
    _, top_k, top_p, min_p, *_ = _params(b, logits.shape[1], **kw)
    return (z >= ref.filter_threshold(z, top_k, top_p, min_p)[:, None])[0].tolist()


def test_filters_hand_computed():
    lp = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    assert _kept(lp, top_p=0.6) == [True, True, False, False, False]  # 0.5 < 0.6 <= 0.7
    assert _kept(lp, top_p=0.5) == [True, False, False, False, False]  # the first token alone reaches 0.5
    assert _kept(lp, min_p=0.3) == [True, True, True, False, False]  # p >= 0.15
    assert _kept(lp, top_k=2) == [True, True, False, False, False]
    assert _kept(lp, top_k=3, min_p=0.35) == [True, True, False, False, False]
    # top-p works on the distribution renormalized after top-k: 0.4/(0.4+0.3) >= 0.5, while 0.4 alone < 0.5.
    lp = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    assert _kept(lp, top_p=0.5) == [True, True, False, False]
    assert _kept(lp, top_k=2, top_p=0.5) == [True, False, False, False]
    # Ties at the boundary are kept, for top-k and for top-p.
    lp = torch.log(torch.tensor([[0.4, 0.2, 0.2, 0.2]]))
    assert _kept(lp, top_k=2) == [True, True, True, True]
    assert _kept(lp, top_p=0.5) == [True, True, True, True]
    assert _kept(lp, top_k=4, top_p=1.0) == [True] * 4


def _chi2(counts, probs):
    n = counts.sum()
    expected = probs * n
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a filtered-out token was drawn"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()), int(keep.sum()) - 1


@pytest.mark.parametrize("temperature,top_k,min_p", [(1.0, 0, 0.0), (0.6, 0, 0.0), (1.3, 4, 0.0), (1.0, 0, 0.2)])
def test_frequencies_follow_filtered_softmax(temperature, top_k, min_p):
    """Many seeds, one logits row: token counts vs the (filtered, renormalized) softmax, chi-square bound."""
    logits = torch.tensor([1.0, 0.5, 0.0, -0.3, 2.0, -1.0, 0.8, 0.1])
    n = 20000
    params = _params(n, 8, temperature=temperature, top_k=top_k, min_p=min_p,
                     seeds=torch.arange(n, dtype=torch.int64) * 7919 + 11)
    tokens = ref.sample(logits.expand(n, 8), *params)
    z = logits / temperature
    p = torch.softmax(z, dim=0)
    keep = torch.ones(8, dtype=torch.bool)
    if top_k:
        keep &= z >= z.topk(top_k).values[-1]
    if min_p:
        keep &= p >= min_p * p.max()
    probs = torch.where(keep, p, 0.0)
    probs = probs / probs.sum()
    stat, df = _chi2(torch.bincount(tokens, minlength=8).double(), probs.double())
    # The 99.99% quantile of chi-square with df <= 7 is below 30: with fixed seeds this cannot flake.
    assert stat < 30.0, (stat, df)


def test_draw_does_not_depend_on_batch_position():
    g = torch.Generator().manual_seed(1)
    row = torch.randn(1, 500, generator=g)
    others = torch.randn(6, 500, generator=g)
    seeds = torch.tensor([123456789012, 5, 6, 7, 8, 9, 10])
    for pos in (0, 3, 6):
        logits = torch.cat([others[:pos], row, others[pos:]])
        s = torch.cat([seeds[1:pos + 1], seeds[:1], seeds[pos + 1:]])
        params = _params(7, 500, temperature=0.9, top_p=0.95, seeds=s, sample=2, step=41)
        got = {impl(logits, *params)[pos].item() for impl in (ref.sample, sk.sample)}
        alone = ref.sample(row, *_params(1, 500, temperature=0.9, top_p=0.95, seeds=seeds[:1], sample=2, step=41))
        assert got == {alone.item()}
    # Each step draws from a fresh stream: 64 steps of one sample spread over many tokens.
    p = list(_params(64, 500, seeds=seeds[:1].expand(64).clone()))
    p[6] = torch.arange(64, dtype=torch.int64)
    assert len(set(ref.sample(row.expand(64, 500), *p).tolist())) > 10


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_matches_ref_token_for_token(dtype):
    g = torch.Generator().manual_seed(2)
    b, vocab = 24, 1000  # vocab not a multiple of the tile
    logits = (torch.randn(b, vocab, generator=g) * 3).to(dtype)
    logits[5, 17] = float("-inf")
    temperature = torch.rand(b, generator=g) * 1.5
    temperature[::6] = 0.0
    top_k = torch.randint(-1, 60, (b,), generator=g, dtype=torch.int32)
    top_k[::5] = vocab
    top_p = torch.where(torch.rand(b, generator=g) < 0.5, torch.rand(b, generator=g), torch.ones(b))
    min_p = torch.where(torch.rand(b, generator=g) < 0.3, torch.rand(b, generator=g) * 0.3, torch.zeros(b))
    seeds = torch.randint(0, 2**62, (b,), generator=g)
    sample_index = torch.randint(0, 8, (b,), generator=g)
    step = torch.randint(0, 5000, (b,), generator=g)
    args = (logits, temperature, top_k, top_p, min_p, seeds, sample_index, step)
    want = ref.sample(*args)
    assert torch.equal(sk.sample(*args), want)
    # Without any filter the kernel path skips the threshold computation: still the same draws.
    free = (logits, temperature, torch.zeros_like(top_k), torch.ones_like(top_p), torch.zeros_like(min_p),
            seeds, sample_index, step)
    assert torch.equal(sk.sample(*free), ref.sample(*free))


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match="top_p"):
        ref.sample(torch.zeros(2, 5), *_params(2, 5)[:2], torch.ones(3), *_params(2, 5)[3:])
    with pytest.raises(ValueError, match="logits"):
        sk.sample(torch.zeros(5), *_params(5, 5))

"""Reference sampler: temperature / top-k / top-p / min-p with counter-based Gumbel-max randomness.

Each sample's token depends only on (logits row, its parameters, seed, sample index, step): the uniforms
come from a hash of those counters, never from a global generator, so batch composition, preemption or
the device never change a draw. The Triton kernel (sampling.py) draws the very same uniforms.

Filtering is expressed as one threshold per row on the scaled logits z = logits * (1 / T): a token is kept
iff z >= threshold. Top-k, top-p and min-p each give a threshold and the kept set is their intersection
(the largest threshold). In z-space:
- top-k: the k-th largest z (ties at that value are all kept);
- top-p: sort the top-k-renormalized probabilities in descending order, find the first position whose
  cumulative sum reaches top_p; its z is the threshold (tokens tied with it are kept);
- min-p: p >= min_p * max p  <=>  z >= max z + log(min_p).
The threshold computation is shared with the kernel path so both keep exactly the same tokens.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

M32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2**32 for 0 <= x < 2**32 without overflowing int64 (split x into 16-bit halves)."""
    lo = x & 0xFFFF
    hi = x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & M32


def mix32(x: Tensor) -> Tensor:
    """A 32-bit integer finalizer (lowbias32). x: int64 tensor holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def stream_key(seed: Tensor, sample: Tensor, step: Tensor) -> Tensor:
    """Key of the random stream of one generated token: int64 tensors (broadcast) -> int64 in [0, 2**32)."""
    seed, sample, step = (torch.as_tensor(t, dtype=torch.int64) for t in (seed, sample, step))
    h = mix32((seed & M32) ^ 0x9E3779B9)
    h = mix32(h ^ ((seed >> 32) & M32))
    h = mix32(h ^ (sample & M32))
    return mix32(h ^ (step & M32))


def token_hash(token: Tensor) -> Tensor:
    """The key-independent half of `uniform`'s hash."""
    return mix32((torch.as_tensor(token, dtype=torch.int64) + 0x632BE5AB) & M32)


@functools.lru_cache(maxsize=8)
def vocab_token_hash(vocab: int, device: str) -> Tensor:
    """token_hash of 0..vocab-1, memoised: a pure function of its arguments, and half the sampler's hashing."""
    return token_hash(torch.arange(vocab, device=device))


def uniform_from_hash(key: Tensor, hashed_token: Tensor) -> Tensor:
    h = mix32(torch.as_tensor(key, dtype=torch.int64) ^ hashed_token)
    return ((h >> 8).double() + 0.5) * 2.0**-24


def uniform(key: Tensor, token: Tensor) -> Tensor:
    """Uniform in the open interval (0, 1) for (key, token index); float64 so every value is exact."""
    key = torch.as_tensor(key, dtype=torch.int64)
    return uniform_from_hash(key, token_hash(torch.as_tensor(token, device=key.device)))


def gumbel(key: Tensor, token: Tensor) -> Tensor:
    """Standard Gumbel noise -log(-log(u)) in float64."""
    return -torch.log(-torch.log(uniform(key, token)))


def check_sampling_args(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor,
                        seeds: Tensor, sample_index: Tensor, step: Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"sample: logits must be [B, V], got shape {tuple(logits.shape)}")
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"sample: logits dtype must be fp32/fp16/bf16, got {logits.dtype}")
    b = logits.shape[0]
    for name, t in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p), ("min_p", min_p),
                    ("seeds", seeds), ("sample_index", sample_index), ("step", step)):
        if t.shape != (b,):
            raise ValueError(f"sample: {name} must have shape [{b}], got {tuple(t.shape)}")
        if t.device != logits.device:
            raise ValueError(f"sample: {name} is on {t.device}, logits on {logits.device}")


def scaled_logits(logits: Tensor, temperature: Tensor) -> tuple[Tensor, Tensor]:
    """z = logits * (1/T) in fp32 (greedy rows use T=1 so z stays finite); returns (z, inv_temperature).

    Multiplying by a precomputed reciprocal (rather than dividing) makes the kernel's z bit-identical.
    """
    t = temperature.float()
    inv_t = torch.where(t > 0, 1.0 / torch.where(t > 0, t, torch.ones_like(t)), torch.ones_like(t))
    return logits.float() * inv_t[:, None], inv_t


def filter_threshold(z: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor) -> Tensor:
    """Per-row threshold on z: keep z >= threshold. z: [B, V] fp32 -> [B] fp32 (-inf: no filtering)."""
    bsz, vocab = z.shape
    neg_inf = torch.full((bsz,), float("-inf"), device=z.device)
    k = top_k.long()
    k_on = (k > 0) & (k < vocab)
    p_on = top_p.float() < 1.0
    m_on = min_p.float() > 0.0
    zmax = z.max(dim=-1).values
    thr = torch.where(m_on, zmax + torch.log(min_p.float().clamp_min(1e-30)), neg_inf)
    if not bool((k_on | p_on).any()):
        return thr
    zs = torch.sort(z, dim=-1, descending=True).values
    kk = torch.where(k_on, k, torch.full_like(k, vocab))
    thr_k = torch.where(k_on, zs.gather(1, (kk - 1).clamp(0, vocab - 1)[:, None])[:, 0], neg_inf)
    # Probabilities renormalized over the top-k kept set (ties at the k-th value are kept too).
    kept = zs >= thr_k[:, None]
    probs = torch.softmax(torch.where(kept, zs, torch.full_like(zs, float("-inf"))), dim=-1)
    csum = torch.cumsum(probs, dim=-1)
    # The boundary is the first position whose cumulative probability reaches top_p (or the last kept one
    # when rounding keeps the sum just below it).
    n_keep = ((csum < top_p.float()[:, None]) & kept).sum(dim=-1) + 1
    n_keep = torch.minimum(n_keep, kept.sum(dim=-1))
    thr_p = torch.where(p_on, zs.gather(1, (n_keep - 1)[:, None])[:, 0], neg_inf)
    return torch.maximum(thr, torch.maximum(thr_k, thr_p))


def uniforms(key: Tensor, vocab: int) -> Tensor:
    """[B] stream keys -> [B, vocab] float64 uniforms of every token."""
    return uniform_from_hash(key[:, None], vocab_token_hash(vocab, str(key.device))[None, :])


def gumbel_argmax(z: Tensor, threshold: Tensor, u: Tensor) -> Tensor:
    """argmax over the kept tokens (z >= threshold) of z + Gumbel(u), in float64 -> [B]."""
    noise = torch.log(u).neg_().log_()  # log(-log u), in place: one [B, V] float64 buffer
    score = z.double().sub_(noise)
    score.masked_fill_(~(z >= threshold[:, None]), float("-inf"))
    return score.argmax(dim=-1)


def sample(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor,
           seeds: Tensor, sample_index: Tensor, step: Tensor) -> Tensor:
    """Draw one token per row -> int64 [B]. Rows with temperature == 0 take the argmax of the logits."""
    check_sampling_args(logits, temperature, top_k, top_p, min_p, seeds, sample_index, step)
    z, _ = scaled_logits(logits, temperature)
    thr = filter_threshold(z, top_k, top_p, min_p)
    key = stream_key(seeds, sample_index, step)
    drawn = gumbel_argmax(z, thr, uniforms(key, logits.shape[1]))
    greedy = logits.float().argmax(dim=-1)
    return torch.where(temperature <= 0, greedy, drawn)

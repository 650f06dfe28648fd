// The sampler's counter-based uniforms on the CPU: the integer hash of kernels/sampling_ref.py
// (uniform_from_hash o token_hash), exact, so the draws are bit-identical to the reference's.
#pragma once

#include <cstdint>

namespace step3vl::cpu {

// out[b, v] = ((mix32(keys[b] ^ mix32(v + 0x632BE5AB)) >> 8) + 0.5) * 2^-24 for v < vocab; keys in [0, 2^32).
void sampling_uniforms(const int64_t *keys, int64_t rows, int64_t vocab, double *out);

// keys[b] = sampling_ref.stream_key(seeds[b], samples[b], steps[b]), in [0, 2^32).
void sampling_stream_keys(const int64_t *seeds, const int64_t *samples, const int64_t *steps, int64_t rows,
                          int64_t *keys);

}  // namespace step3vl::cpu

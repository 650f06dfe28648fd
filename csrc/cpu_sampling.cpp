// See cpu_sampling.h. Plain loops over uint32 lanes: the compiler vectorizes them (one clone per ISA).
#include "cpu_sampling.h"

#include "cpu_features.h"

namespace step3vl::cpu {
namespace {

inline uint32_t mix32(uint32_t x) {  // lowbias32, as sampling_ref.mix32
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  return x ^ (x >> 16);
}

STEP3VL_CLONES void row_uniforms(uint32_t key, int64_t vocab, double *out) {
  for (int64_t v = 0; v < vocab; ++v) {
    const uint32_t h = mix32(key ^ mix32(static_cast<uint32_t>(v) + 0x632BE5ABu));
    out[v] = (static_cast<double>(h >> 8) + 0.5) * (1.0 / 16777216.0);
  }
}

}  // namespace

void sampling_uniforms(const int64_t *keys, int64_t rows, int64_t vocab, double *out) {
#pragma omp parallel for schedule(static) if (rows > 1)
  for (int64_t b = 0; b < rows; ++b) row_uniforms(static_cast<uint32_t>(keys[b]), vocab, out + b * vocab);
}

void sampling_stream_keys(const int64_t *seeds, const int64_t *samples, const int64_t *steps, int64_t rows,
                          int64_t *keys) {
  for (int64_t b = 0; b < rows; ++b) {
    const uint64_t seed = static_cast<uint64_t>(seeds[b]);
    uint32_t h = mix32(static_cast<uint32_t>(seed) ^ 0x9E3779B9u);
    h = mix32(h ^ static_cast<uint32_t>(seed >> 32));
    h = mix32(h ^ static_cast<uint32_t>(samples[b]));
    keys[b] = mix32(h ^ static_cast<uint32_t>(steps[b]));
  }
}

}  // namespace step3vl::cpu

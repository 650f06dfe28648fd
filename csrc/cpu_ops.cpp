// See cpu_ops.h. Plain loops, vectorized by the compiler (one clone per ISA).
#include "cpu_ops.h"

#include <cmath>

#include "cpu_attention.h"  // has_avx512
#include "cpu_features.h"
#include "simd_math.h"

namespace step3vl::cpu {


STEP3VL_CLONES void rms_norm(const float *x, const float *w, float eps, int64_t rows, int64_t h, float *out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float *xr = x + r * h;
    float ss = 0.0f;
    for (int64_t i = 0; i < h; ++i) ss += xr[i] * xr[i];
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(h) + eps);
    float *o = out + r * h;
    for (int64_t i = 0; i < h; ++i) o[i] = w[i] * (xr[i] * inv);
  }
}

STEP3VL_CLONES void rope_rotate_half(float *x, int64_t tokens, int64_t heads, int64_t d, int64_t stride,
                                     const float *cos, const float *sin) {
  const int64_t half = d / 2;
  for (int64_t t = 0; t < tokens; ++t) {
    const float *c = cos + t * d, *s = sin + t * d;
    for (int64_t h = 0; h < heads; ++h) {
      float *v = x + t * stride + h * d;
      for (int64_t i = 0; i < half; ++i) {
        const float a = v[i], b = v[i + half];
        v[i] = a * c[i] - b * s[i];
        v[i + half] = b * c[i + half] + a * s[i + half];
      }
    }
  }
}

#if STEP3VL_X86
namespace {

__attribute__((target("avx512f"))) void silu_mul_avx512(const float *g, const float *u, int64_t n, float *o) {
  int64_t i = 0;
  const __m512 one = _mm512_set1_ps(1.0f);
  for (; i + 16 <= n; i += 16) {
    const __m512 gv = _mm512_loadu_ps(g + i);
    const __m512 sig = _mm512_div_ps(one, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
    _mm512_storeu_ps(o + i, _mm512_mul_ps(_mm512_mul_ps(gv, sig), _mm512_loadu_ps(u + i)));
  }
  for (; i < n; ++i) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}

}  // namespace
#endif

void silu_mul(const float *gate, const float *up, int64_t tokens, int64_t inter, int64_t in_stride, float *out) {
  [[maybe_unused]] const bool simd = has_avx512();
  for (int64_t t = 0; t < tokens; ++t) {
    const float *g = gate + t * in_stride, *u = up + t * in_stride;
    float *o = out + t * inter;
#if STEP3VL_X86
    if (simd) {
      silu_mul_avx512(g, u, inter, o);
      continue;
    }
#endif
    for (int64_t i = 0; i < inter; ++i) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
  }
}

}  // namespace step3vl::cpu

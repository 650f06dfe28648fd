// CPU packed linear; see cpu_linear.h. An AVX-512 path (selected at run time) and a portable path.
#include "cpu_linear.h"

#include "cpu_features.h"

#include <algorithm>
#include <cstring>

#include "cpu_attention.h"  // has_avx512

namespace step3vl::cpu {
namespace {

constexpr int kCols = kLinearColumns;
constexpr int64_t kPrefetchK = 32;  // k-steps ahead (1 KB of bf16 weights per column block)

inline float weight_at(const PackedLinearArgs &a, int64_t nb, int64_t k, int64_t c) {
  if (a.layout == kF32) return static_cast<const float *>(a.w)[(nb * a.k + k) * kCols + c];
  int64_t i = (nb * a.k + k) * kCols + c;
  if (a.layout == kBf16Amx) {
    const int64_t kp = (a.k + kAmxK - 1) / kAmxK * kAmxK;
    i = ((nb * kp / 2 + k / 2) * kCols + c) * 2 + (k & 1);
  }
  const uint32_t u = static_cast<uint32_t>(static_cast<const uint16_t *>(a.w)[i]) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

void block_portable(const PackedLinearArgs &a, int64_t nb) {
  const int64_t cols = std::min<int64_t>(kCols, a.n - nb * kCols);
  for (int64_t m = 0; m < a.m; ++m) {
    float acc[kCols] = {};
    for (int64_t k = 0; k < a.k; ++k) {
      const float xv = a.x[m * a.k + k];
      for (int c = 0; c < kCols; ++c) acc[c] += xv * weight_at(a, nb, k, c);
    }
    for (int64_t c = 0; c < cols; ++c)
      a.y[m * a.n + nb * kCols + c] = acc[c] + (a.bias ? a.bias[nb * kCols + c] : 0.0f);
  }
}

#if STEP3VL_X86
__attribute__((target("avx512f"))) inline __m512 load_weights(const void *w, bool bf16, int64_t at) {
  if (bf16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(static_cast<const uint16_t *>(w) + at));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  return _mm512_loadu_ps(static_cast<const float *>(w) + at);
}

// MR rows x (NR x 16) columns: per k, NR weight vectors and MR broadcasts feed MR x NR independent FMAs.
template <int MR, int NR, bool BF16>
__attribute__((target("avx512f"))) void micro(const PackedLinearArgs &a, int64_t m0, int64_t nb) {
  __m512 acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NR; ++c) acc[r][c] = _mm512_setzero_ps();
  const float *x = a.x + m0 * a.k;
  const int64_t stride = a.k * kCols;  // between consecutive column blocks
  const int64_t base = nb * stride;
  const char *wbytes = static_cast<const char *>(a.w);
  constexpr int64_t es = BF16 ? 2 : 4;
  for (int64_t k = 0; k < a.k; ++k) {
    // The weights come from memory once per step: fetch ahead so the loads overlap the FMAs.
    if ((k & (BF16 ? 1 : 0)) == 0)
      for (int c = 0; c < NR; ++c)
        _mm_prefetch(wbytes + (base + c * stride + (k + kPrefetchK) * kCols) * es, _MM_HINT_T0);
    __m512 w[NR];
    for (int c = 0; c < NR; ++c) w[c] = load_weights(a.w, BF16, base + c * stride + k * kCols);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m512 xv = _mm512_set1_ps(x[r * a.k + k]);
      for (int c = 0; c < NR; ++c) acc[r][c] = _mm512_fmadd_ps(xv, w[c], acc[r][c]);
    }
  }
  for (int c = 0; c < NR; ++c) {
    const int64_t col0 = (nb + c) * kCols, cols = std::min<int64_t>(kCols, a.n - col0);
    const __mmask16 mask = static_cast<__mmask16>(cols >= kCols ? 0xFFFF : (1u << cols) - 1u);
    const __m512 bias = a.bias ? _mm512_maskz_loadu_ps(mask, a.bias + col0) : _mm512_setzero_ps();
    for (int r = 0; r < MR; ++r) _mm512_mask_storeu_ps(a.y + (m0 + r) * a.n + col0, mask, _mm512_add_ps(acc[r][c], bias));
  }
}

// Column blocks [nb, nb + NR) for every row, in row chunks sized to fill the 32 vector registers.
template <int NR, bool BF16>
__attribute__((target("avx512f"))) void block_avx512(const PackedLinearArgs &a, int64_t nb) {
  int64_t m = 0;
  constexpr int kBig = NR == 1 ? 16 : NR == 2 ? 12 : 8;
  for (; m + kBig <= a.m; m += kBig) micro<kBig, NR, BF16>(a, m, nb);
  if (m + 8 <= a.m) micro<8, NR, BF16>(a, m, nb), m += 8;
  if (m + 4 <= a.m) micro<4, NR, BF16>(a, m, nb), m += 4;
  if (m + 2 <= a.m) micro<2, NR, BF16>(a, m, nb), m += 2;
  if (m < a.m) micro<1, NR, BF16>(a, m, nb);
}

template <bool BF16>
__attribute__((target("avx512f"))) void group_avx512(const PackedLinearArgs &a, int64_t nb, int64_t blocks) {
  if (nb + 2 < blocks)
    block_avx512<3, BF16>(a, nb);
  else if (nb + 1 < blocks)
    block_avx512<2, BF16>(a, nb);
  else
    block_avx512<1, BF16>(a, nb);
}

#endif  // STEP3VL_X86

}  // namespace

void linear_packed(const PackedLinearArgs &a, bool simd) {
  if (simd && a.layout == kBf16Amx && has_amx()) return linear_amx(a);
  simd = STEP3VL_X86 && simd && a.layout != kBf16Amx && has_avx512();
  (void)simd;  // only read by the x86 paths
  const int64_t blocks = (a.n + kCols - 1) / kCols;
  // Pairs of column blocks split over torch's OpenMP threads (see cpu_attention.cpp); each thread streams its
  // own slice of the weights, which stays in cache across the row chunks.
#pragma omp parallel for schedule(static)
  for (int64_t group = 0; group < (blocks + 2) / 3; ++group) {
    const int64_t nb = 3 * group;
#if STEP3VL_X86
    if (simd) {
      if (a.layout == kBf16)
        group_avx512<true>(a, nb, blocks);
      else
        group_avx512<false>(a, nb, blocks);
      continue;
    }
#endif
    for (int64_t b = nb; b < std::min(nb + 3, blocks); ++b) block_portable(a, b);
  }
}

}  // namespace step3vl::cpu

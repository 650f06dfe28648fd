// AMX-BF16 packed linear; see cpu_linear.h (linear_amx). Tiles: C0, C1 (two 16-column output blocks, fp32),
// A0..A2 (the three bf16 terms of 16 rows x 32 k of x), B0, B1 (32 k x 16 columns of each block's weights).
// Every row count takes the same tile path, and a tile row's result depends on that row alone, so a sequence's
// logits do not change with the batch it shares a step with (the engine's seeded-sampling promise).
#include "cpu_linear.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "cpu_features.h"

#if STEP3VL_X86
#include <sys/syscall.h>
#include <unistd.h>

namespace step3vl::cpu {
namespace {

constexpr int kCols = kLinearColumns;
constexpr int kRows = 16;  // rows of x per tile
constexpr int64_t kBandRows = 128;  // rows of x per pass over the weights (prefill)

struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

bool request_amx() {
  if (!__builtin_cpu_supports("amx-bf16") || !__builtin_cpu_supports("avx512bf16")) return false;
  constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
}

// x [m, k] fp32 -> three bf16 terms [3, m_pad, kp] (zero-padded rows and columns), hi + mid + lo == x to
// ~2^-27 relative: each term is the round-to-nearest bf16 of what the previous ones left.
__attribute__((target("avx512f,avx512bf16,avx512bw,avx512vl"))) void split_rows(const float *x, int64_t m, int64_t k, int64_t kp,
                                                              int64_t m_pad, uint16_t *out) {
  const int64_t plane = m_pad * kp;
  std::fill(out, out + 3 * plane, uint16_t{0});
#pragma omp parallel for schedule(static) if (m * k > (1 << 16))
  for (int64_t r = 0; r < m; ++r) {
    int64_t c = 0;
    for (; c + 16 <= k; c += 16) {
      __m512 rest = _mm512_loadu_ps(x + r * k + c);
      for (int t = 0; t < 3; ++t) {
        const __m256bh h = _mm512_cvtneps_pbh(rest);
        _mm256_storeu_si256(reinterpret_cast<__m256i *>(out + t * plane + r * kp + c), reinterpret_cast<__m256i>(h));
        rest = _mm512_sub_ps(rest, _mm512_cvtpbh_ps(h));
      }
    }
    if (c < k) {
      const __mmask16 tail = static_cast<__mmask16>((1u << (k - c)) - 1u);
      __m512 rest = _mm512_maskz_loadu_ps(tail, x + r * k + c);
      for (int t = 0; t < 3; ++t) {
        const __m256bh h = _mm512_cvtneps_pbh(rest);
        _mm256_mask_storeu_epi16(out + t * plane + r * kp + c, tail, reinterpret_cast<__m256i>(h));
        rest = _mm512_sub_ps(rest, _mm512_cvtpbh_ps(h));
      }
    }
  }
}

// C tile -> y rows [m0, m0 + rows) of columns [col0, col0 + cols), plus bias.
void store_block(const float *tile, const PackedLinearArgs &a, int64_t m0, int64_t rows, int64_t col0) {
  const int64_t cols = std::min<int64_t>(kCols, a.n - col0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c)
      a.y[(m0 + r) * a.n + col0 + c] = tile[r * kCols + c] + (a.bias ? a.bias[col0 + c] : 0.0f);
}

// Output blocks nb (and nb + 1 when pair) for rows [m_begin, m_end).
__attribute__((target("amx-tile,amx-bf16"))) void column_pair(const PackedLinearArgs &a, const uint16_t *xs,
                                                              int64_t m_pad, int64_t kp, int64_t nb, bool pair,
                                                              int64_t m_begin, int64_t m_end, float *tile) {
  const int64_t plane = m_pad * kp, block = kp * kCols;  // bf16 elements per x term / per weight block
  const uint16_t *w0 = static_cast<const uint16_t *>(a.w) + nb * block, *w1 = w0 + block;
  for (int64_t m0 = m_begin; m0 < m_end; m0 += kRows) {
    _tile_zero(0);
    _tile_zero(1);
    for (int64_t k0 = 0; k0 < kp; k0 += kAmxK) {
      // The weights come from memory once per step: fetch the next k-chunk while this one multiplies.
      for (int line = 0; line < 16; ++line) {
        _mm_prefetch(reinterpret_cast<const char *>(w0 + (k0 + 4 * kAmxK) * kCols) + line * 64, _MM_HINT_T0);
        if (pair) _mm_prefetch(reinterpret_cast<const char *>(w1 + (k0 + 4 * kAmxK) * kCols) + line * 64, _MM_HINT_T0);
      }
      const uint16_t *xa = xs + m0 * kp + k0;
      _tile_loadd(2, xa, kp * 2);
      _tile_loadd(3, xa + plane, kp * 2);
      _tile_loadd(4, xa + 2 * plane, kp * 2);
      _tile_loadd(5, w0 + k0 * kCols, 64);
      _tile_dpbf16ps(0, 2, 5);
      _tile_dpbf16ps(0, 3, 5);
      _tile_dpbf16ps(0, 4, 5);
      if (pair) {
        _tile_loadd(6, w1 + k0 * kCols, 64);
        _tile_dpbf16ps(1, 2, 6);
        _tile_dpbf16ps(1, 3, 6);
        _tile_dpbf16ps(1, 4, 6);
      }
    }
    const int64_t rows = std::min<int64_t>(kRows, a.m - m0);
    _tile_stored(0, tile, kCols * 4);
    store_block(tile, a, m0, rows, nb * kCols);
    if (pair) {
      _tile_stored(1, tile, kCols * 4);
      store_block(tile, a, m0, rows, (nb + 1) * kCols);
    }
  }
}

__attribute__((target("amx-tile"))) void amx_begin(const TileConfig *cfg) { _tile_loadconfig(cfg); }
__attribute__((target("amx-tile"))) void amx_end() { _tile_release(); }

}  // namespace

bool has_amx() {
  static const bool ok = request_amx();  // one syscall per process; constant afterwards
  return ok;
}

void linear_amx(const PackedLinearArgs &a) {
  const int64_t kp = (a.k + kAmxK - 1) / kAmxK * kAmxK, m_pad = (a.m + kRows - 1) / kRows * kRows;
  const int64_t blocks = (a.n + kCols - 1) / kCols;
  thread_local std::vector<uint16_t> xs;  // the calling thread's split of x, shared with the workers below
  xs.resize(3 * m_pad * kp);
  split_rows(a.x, a.m, a.k, kp, m_pad, xs.data());
  const uint16_t *xsp = xs.data();
#pragma omp parallel
  {
    // Fewer than 16 rows: tiles of that many rows (a tile op's cost follows its rows; the rows computed are
    // the same either way, so results do not depend on the row count).
    const uint8_t rows = static_cast<uint8_t>(std::min<int64_t>(kRows, a.m));
    TileConfig cfg;
    for (int t : {0, 1}) cfg.rows[t] = rows, cfg.colsb[t] = kCols * 4;  // C: rows x 16 fp32
    for (int t : {2, 3, 4}) cfg.rows[t] = rows, cfg.colsb[t] = kAmxK * 2;  // A: rows x 32 bf16
    for (int t : {5, 6}) cfg.rows[t] = kAmxK / 2, cfg.colsb[t] = kCols * 4;  // B: 16 k-pairs x 16 cols x 2
    alignas(64) float tile[kRows * kCols];
    amx_begin(&cfg);
    // Rows in bands of kBandRows: a band's split activations stay in L2 while every column pair passes over
    // them (one band over all columns re-read the whole x from memory per column pair).
    for (int64_t band = 0; band < a.m; band += kBandRows) {
      const int64_t band_end = std::min(a.m, band + kBandRows);
#pragma omp for schedule(static)
      for (int64_t pair = 0; pair < (blocks + 1) / 2; ++pair)
        column_pair(a, xsp, m_pad, kp, 2 * pair, 2 * pair + 1 < blocks, band, band_end, tile);
    }
    amx_end();
  }
}

}  // namespace step3vl::cpu

#else  // no AMX in this build

namespace step3vl::cpu {

bool has_amx() { return false; }

void linear_amx(const PackedLinearArgs &) {
  throw std::runtime_error("linear_amx: this build of step3vl_native has no AMX path");
}

}  // namespace step3vl::cpu

#endif  // STEP3VL_X86

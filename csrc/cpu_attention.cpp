// CPU cascade decode attention; see cpu_attention.h. An AVX-512 path (selected at run time) and a portable
// path compute the same thing; tests run both against kernels/paged_decode_ref.py.
#include "cpu_attention.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace step3vl::cpu {
namespace {

constexpr int kTile = 64;  // keys per tile: one online-softmax update (rescale) per 64 keys
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline float bf16_to_float(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// One task's working set: queries (pre-scaled; row-major and transposed), running softmax state, one tile.
struct Scratch {
  std::vector<float> q, qt, qt_row, acc, mrun, lrun, alpha, s, kf, vf, zero;
  std::vector<const float *> kr, vr;  // the tile's key / value rows: into the fp32 pool, or into kf / vf (bf16)
  void reset(int64_t m, int64_t d) {
    const int64_t mp = (m + 15) / 16 * 16;
    q.assign(m * d, 0.0f);
    qt.assign(d * mp, 0.0f);
    acc.assign(m * d, 0.0f);
    mrun.assign(mp + 16, kNegInf);  // +16: a row's suffix pass touches a whole vector of lanes from its offset
    lrun.assign(mp + 16, 0.0f);
    alpha.assign(mp + 16, 0.0f);
    s.assign(kTile * mp, 0.0f);
    kf.resize(kTile * d);
    vf.resize(kTile * d);
    zero.assign(d, 0.0f);
    kr.resize(kTile);
    vr.resize(kTile);
  }
};

// [D, mp] transpose of m_count row-major queries, zero-padded to mp columns.
void transpose_queries(const float *q, int64_t m_count, int64_t d, std::vector<float> &qt) {
  const int64_t mp = (m_count + 15) / 16 * 16;
  qt.assign(d * mp, 0.0f);
  for (int64_t m = 0; m < m_count; ++m)
    for (int64_t i = 0; i < d; ++i) qt[i * mp + m] = q[m * d + i];
}

inline void prefetch_line(const char *p) { __builtin_prefetch(p, 0, 3); }

inline void load_row(const void *cache, bool bf16, int64_t at, int64_t d, float *dst) {
  if (bf16) {
    const uint16_t *src = static_cast<const uint16_t *>(cache) + at;
    for (int64_t i = 0; i < d; ++i) dst[i] = bf16_to_float(src[i]);
  } else {
    std::memcpy(dst, static_cast<const float *>(cache) + at, d * sizeof(float));
  }
}

// ---- portable path -------------------------------------------------------------------------------------
void tile_portable(const float *q, int m_count, int64_t d, const float *const *kr, const float *const *vr, int n, float *acc,
                   float *mrun, float *lrun) {
  float s[kTile];
  for (int m = 0; m < m_count; ++m) {
    const float *qm = q + m * d;
    float mx = mrun[m];
    for (int j = 0; j < n; ++j) {
      float dot = 0.0f;
      for (int64_t i = 0; i < d; ++i) dot += qm[i] * kr[j][i];
      s[j] = dot;
      mx = std::max(mx, dot);
    }
    const float alpha = mrun[m] == kNegInf ? 0.0f : std::exp(mrun[m] - mx);
    float sum = 0.0f;
    for (int j = 0; j < n; ++j) {
      s[j] = std::exp(s[j] - mx);
      sum += s[j];
    }
    lrun[m] = lrun[m] * alpha + sum;
    mrun[m] = mx;
    float *am = acc + m * d;
    for (int64_t i = 0; i < d; ++i) {
      float v = am[i] * alpha;
      for (int j = 0; j < n; ++j) v += s[j] * vr[j][i];
      am[i] = v;
    }
  }
}

// ---- AVX-512 path --------------------------------------------------------------------------------------
// exp for x <= 0 (scores minus their running max), Cephes expf polynomial: ~1 ulp, exp(-inf) -> 0.
__attribute__((target("avx512f"))) inline __m512 exp512(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.0f);
  const __mmask16 underflow = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  x = _mm512_max_ps(x, lo);
  const __m512 fx = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~underflow), _mm512_scalef_ps(y, fx));
}

// Scores are key-major, s[j * mp + m] (mp = queries padded to 16), so the online softmax runs across 16
// queries per vector with no horizontal reductions.

// qt [D, mp] holds the queries transposed (once per task for a group, once per row for its suffix); each key's
// elements are broadcast against 16 queries at a time, 4 keys x NV query vectors of independent accumulators.
// (Per-key dot products with a horizontal sum were latency-bound: 3x slower for a row's few GQA heads.)
template <int NV>
__attribute__((target("avx512f"))) inline void scores_block(const float *qt, int64_t mp, int64_t c0, int64_t d,
                                                            const float *const *kr, int64_t j0, float *s) {
  __m512 a[4][NV];
  for (int jj = 0; jj < 4; ++jj)
    for (int v = 0; v < NV; ++v) a[jj][v] = _mm512_setzero_ps();
  for (int64_t i = 0; i < d; ++i) {
    __m512 qv[NV];
    for (int v = 0; v < NV; ++v) qv[v] = _mm512_loadu_ps(qt + i * mp + c0 + 16 * v);
#pragma GCC unroll 4
    for (int jj = 0; jj < 4; ++jj) {
      const __m512 kb = _mm512_set1_ps(kr[j0 + jj][i]);
      for (int v = 0; v < NV; ++v) a[jj][v] = _mm512_fmadd_ps(kb, qv[v], a[jj][v]);
    }
  }
  for (int jj = 0; jj < 4; ++jj)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(s + (j0 + jj) * mp + c0 + 16 * v, a[jj][v]);
}

__attribute__((target("avx512f"))) void scores_many(const float *qt, int64_t mp, int64_t d, const float *const *kr, int n,
                                                    float *s) {
  for (int64_t j0 = 0; j0 < n; j0 += 4) {  // kf rows past n are zero: whole groups of 4 are safe
    int64_t c0 = 0;
    for (; c0 + 48 <= mp; c0 += 48) scores_block<3>(qt, mp, c0, d, kr, j0, s);
    for (; c0 < mp; c0 += 16) scores_block<1>(qt, mp, c0, d, kr, j0, s);
  }
}

// acc[m + r, c:c+16U] = acc * alpha + sum_j p[j, m + r] v[j, c:c+16U] for R consecutive queries.
template <int R, int U>
__attribute__((target("avx512f"))) inline void pv_chunk(const float *s, int64_t mp, int64_t m, const float *alpha,
                                                        const float *const *vr, int n, int64_t d, int64_t c,
                                                        float *acc) {
  __m512 a[R][U];
  for (int r = 0; r < R; ++r) {
    const __m512 al = _mm512_set1_ps(alpha[m + r]);
    for (int u = 0; u < U; ++u) a[r][u] = _mm512_mul_ps(_mm512_loadu_ps(acc + (m + r) * d + c + 16 * u), al);
  }
  for (int j = 0; j < n; ++j) {
    __m512 vv[U];
    for (int u = 0; u < U; ++u) vv[u] = _mm512_loadu_ps(vr[j] + c + 16 * u);
    for (int r = 0; r < R; ++r) {
      const __m512 p = _mm512_set1_ps(s[j * mp + m + r]);
      for (int u = 0; u < U; ++u) a[r][u] = _mm512_fmadd_ps(p, vv[u], a[r][u]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < U; ++u) _mm512_storeu_ps(acc + (m + r) * d + c + 16 * u, a[r][u]);
}

template <int R>
__attribute__((target("avx512f"))) inline void pv_rows(const float *s, int64_t mp, int64_t m, const float *alpha,
                                                       const float *const *vr, int n, int64_t d, float *acc) {
  int64_t c = 0;
  for (; c + 64 <= d; c += 64) pv_chunk<R, 4>(s, mp, m, alpha, vr, n, d, c, acc);
  for (; c < d; c += 16) pv_chunk<R, 1>(s, mp, m, alpha, vr, n, d, c, acc);
}

__attribute__((target("avx512f"))) void tile_avx512(const float *qt, int m_count, int64_t d,
                                                    const float *const *kr, const float *const *vr, int n, float *s,
                                                    float *alpha, float *acc, float *mrun, float *lrun) {
  const int64_t mp = (m_count + 15) / 16 * 16;
  scores_many(qt, mp, d, kr, n, s);
  const __m512 neg_inf = _mm512_set1_ps(kNegInf);
  for (int64_t c = 0; c < m_count; c += 16) {
    const __mmask16 lanes = static_cast<__mmask16>(m_count - c >= 16 ? 0xFFFF : (1u << (m_count - c)) - 1u);
    const __m512 m_old = _mm512_mask_loadu_ps(neg_inf, lanes, mrun + c);
    __m512 mx = m_old;
    for (int j = 0; j < n; ++j) mx = _mm512_max_ps(mx, _mm512_loadu_ps(s + j * mp + c));
    const __m512 al = exp512(_mm512_sub_ps(m_old, mx));  // first tile: exp(-inf) = 0
    __m512 l = _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes, lrun + c), al);
    for (int j = 0; j < n; ++j) {
      const __m512 p = exp512(_mm512_sub_ps(_mm512_loadu_ps(s + j * mp + c), mx));
      _mm512_storeu_ps(s + j * mp + c, p);
      l = _mm512_add_ps(l, p);
    }
    _mm512_mask_storeu_ps(mrun + c, lanes, mx);
    _mm512_mask_storeu_ps(lrun + c, lanes, l);
    _mm512_mask_storeu_ps(alpha + c, lanes, al);
  }
  int64_t m = 0;
  for (; m + 2 <= m_count; m += 2) pv_rows<2>(s, mp, m, alpha, vr, n, d, acc);
  for (; m < m_count; ++m) pv_rows<1>(s, mp, m, alpha, vr, n, d, acc);
}

// ---- one (group, kv head) task ---------------------------------------------------------------------------
struct Task {
  const CascadeDecodeArgs &a;
  bool simd;

  // Element offsets of tokens [t0, t0 + n) of a block table (kv head h) in the pool.
  void tile_offsets(const int32_t *table, int64_t t0, int n, int64_t h, int64_t *at) const {
    const int64_t bs = a.block_size, row = a.num_kv_heads * a.head_dim;
    int64_t blk = t0 / bs, off = t0 % bs;  // walk the table: no division per token
    for (int j = 0; j < n; ++j, ++off) {
      if (off == bs) {
        off = 0;
        ++blk;
      }
      at[j] = (table[blk] * bs + off) * row + h * a.head_dim;
    }
  }

  // The tile after the current one is fetched while the current one computes: rows are scattered over the
  // pool (a few hundred bytes each) and, unprefetched, the suffix passes were bound by memory latency.
  void prefetch(const int64_t *at, int n) const {
    const int64_t es = a.kv_bf16 ? 2 : 4, bytes = a.head_dim * es;
    const char *k = static_cast<const char *>(a.k_cache), *v = static_cast<const char *>(a.v_cache);
    for (int j = 0; j < n; ++j)
      for (int64_t b = 0; b < bytes; b += 64) {
        prefetch_line(k + at[j] * es + b);
        prefetch_line(v + at[j] * es + b);
      }
  }

  // Points kr / vr at the tile's rows: straight into an fp32 pool, into converted copies for bf16. Rows past
  // n point at zeros so the score kernels may run over whole groups of keys.
  void load_tile(const int64_t *at, int n, Scratch &w) const {
    const int64_t d = a.head_dim;
    for (int j = 0; j < n; ++j) {
      if (a.kv_bf16) {
        load_row(a.k_cache, true, at[j], d, w.kf.data() + j * d);
        load_row(a.v_cache, true, at[j], d, w.vf.data() + j * d);
        w.kr[j] = w.kf.data() + j * d;
        w.vr[j] = w.vf.data() + j * d;
      } else {
        w.kr[j] = static_cast<const float *>(a.k_cache) + at[j];
        w.vr[j] = static_cast<const float *>(a.v_cache) + at[j];
      }
    }
    for (int j = n; j < kTile; ++j) w.kr[j] = w.vr[j] = w.zero.data();
  }

  // Streams `len` tokens of one block table through the running softmax of queries [q_off, q_off + m_count).
  void stream(const int32_t *table, int64_t len, int64_t h, Scratch &w, int64_t q_off, int m_count,
              const float *qt) const {
    const int64_t d = a.head_dim;
    const float *q = w.q.data() + q_off * d;
    float *acc = w.acc.data() + q_off * d, *mrun = w.mrun.data() + q_off, *lrun = w.lrun.data() + q_off;
    int64_t cur[kTile], next[kTile];
    int n = static_cast<int>(std::min<int64_t>(kTile, len));
    tile_offsets(table, 0, n, h, cur);
    for (int64_t t0 = 0; t0 < len; t0 += kTile) {
      const int n_next = static_cast<int>(std::clamp<int64_t>(len - t0 - kTile, 0, kTile));
      tile_offsets(table, t0 + kTile, n_next, h, next);
      prefetch(next, n_next);
      load_tile(cur, n, w);
      if (simd)
        tile_avx512(qt, m_count, d, w.kr.data(), w.vr.data(), n, w.s.data(), w.alpha.data() + q_off, acc, mrun,
                    lrun);
      else
        tile_portable(q, m_count, d, w.kr.data(), w.vr.data(), n, acc, mrun, lrun);
      std::copy(next, next + n_next, cur);
      n = n_next;
    }
  }

  void operator()(int64_t g, int64_t h, Scratch &w) const {
    const int64_t d = a.head_dim, r = a.num_q_heads / a.num_kv_heads;
    const int32_t *rows = a.group_rows + a.group_ptr[g];
    const int64_t nrows = a.group_ptr[g + 1] - a.group_ptr[g];
    if (nrows == 0) return;
    const int64_t m = nrows * r;
    w.reset(m, d);
    for (int64_t i = 0; i < nrows; ++i)
      for (int64_t j = 0; j < r; ++j) {
        const float *src = a.q + (rows[i] * a.num_q_heads + h * r + j) * d;
        float *dst = w.q.data() + (i * r + j) * d;
        for (int64_t c = 0; c < d; ++c) dst[c] = src[c] * a.scale;
      }
    if (simd) transpose_queries(w.q.data(), m, d, w.qt);
    stream(a.prefix_tables + g * a.prefix_stride, a.prefix_lens[g], h, w, 0, static_cast<int>(m), w.qt.data());
    for (int64_t i = 0; i < nrows; ++i) {
      if (simd) transpose_queries(w.q.data() + i * r * d, r, d, w.qt_row);
      stream(a.suffix_tables + rows[i] * a.suffix_stride, a.suffix_lens[rows[i]], h, w, i * r,
             static_cast<int>(r), w.qt_row.data());
    }
    for (int64_t i = 0; i < nrows; ++i)
      for (int64_t j = 0; j < r; ++j) {
        const int64_t mi = i * r + j;
        const float inv = w.lrun[mi] > 0.0f ? 1.0f / w.lrun[mi] : 0.0f;  // no keys: output 0, as the reference
        float *dst = a.out + (rows[i] * a.num_q_heads + h * r + j) * d;
        for (int64_t c = 0; c < d; ++c) dst[c] = w.acc[mi * d + c] * inv;
      }
  }
};

void check_table(const char *name, const int32_t *table, int64_t stride, int64_t row, int64_t len,
                 const CascadeDecodeArgs &a) {
  if (len < 0 || len > stride * a.block_size)
    throw std::invalid_argument(std::string(name) + " row " + std::to_string(row) + ": length " +
                                std::to_string(len) + " does not fit its " + std::to_string(stride) +
                                " blocks of " + std::to_string(a.block_size) + " tokens");
  for (int64_t i = 0; i < (len + a.block_size - 1) / a.block_size; ++i) {
    const int32_t b = table[row * stride + i];
    if (b < 0 || b >= a.num_blocks)
      throw std::invalid_argument(std::string(name) + " row " + std::to_string(row) + " entry " +
                                  std::to_string(i) + ": block " + std::to_string(b) + " outside the pool of " +
                                  std::to_string(a.num_blocks) + " blocks");
  }
}

}  // namespace

bool has_avx512() { return __builtin_cpu_supports("avx512f"); }

void check_cascade_decode(const CascadeDecodeArgs &a) {
  if (a.num_kv_heads <= 0 || a.num_q_heads % a.num_kv_heads != 0)
    throw std::invalid_argument("cascade_decode_cpu: num_q_heads " + std::to_string(a.num_q_heads) +
                                " is not a multiple of num_kv_heads " + std::to_string(a.num_kv_heads));
  if (a.head_dim <= 0 || a.block_size <= 0)
    throw std::invalid_argument("cascade_decode_cpu: head_dim and block_size must be positive");
  if (a.group_ptr[0] != 0 || a.group_ptr[a.num_groups] != a.batch)
    throw std::invalid_argument("cascade_decode_cpu: group offsets must run from 0 to the batch size " +
                                std::to_string(a.batch));
  std::vector<char> seen(a.batch, 0);
  for (int64_t g = 0; g < a.num_groups; ++g) {
    if (a.group_ptr[g + 1] < a.group_ptr[g])
      throw std::invalid_argument("cascade_decode_cpu: group offsets decrease at group " + std::to_string(g));
    check_table("prefix_block_tables", a.prefix_tables, a.prefix_stride, g, a.prefix_lens[g], a);
  }
  for (int64_t i = 0; i < a.batch; ++i) {
    const int32_t row = a.group_rows[i];
    if (row < 0 || row >= a.batch || seen[row])
      throw std::invalid_argument("cascade_decode_cpu: group rows must list every row once; bad row " +
                                  std::to_string(row));
    seen[row] = 1;
    check_table("suffix_block_tables", a.suffix_tables, a.suffix_stride, i, a.suffix_lens[i], a);
  }
}

void cascade_decode(const CascadeDecodeArgs &a, bool simd) {
  simd = simd && a.head_dim % 16 == 0 && has_avx512();
  const Task task{a, simd};
  const int64_t hkv = a.num_kv_heads;
  const int n_tasks = static_cast<int>(a.num_groups * hkv);
  // OpenMP, so the tasks run on the same runtime and threads as torch's intra-op pool (torch ships
  // libgomp.so.1 and the loader keeps one copy per process): a second pool would fight torch's spinning
  // workers for the cores.
#pragma omp parallel for schedule(dynamic, 1) if (n_tasks > 1)
  for (int t = 0; t < n_tasks; ++t) {
    thread_local Scratch w;  // reused across calls: no allocation per tile or per layer
    task(t / hkv, t % hkv, w);
  }
}

}  // namespace step3vl::cpu

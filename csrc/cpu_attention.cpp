// CPU cascade decode attention; see cpu_attention.h. An AVX-512 path (selected at run time) and a portable
// path compute the same thing; tests run both against kernels/paged_decode_ref.py.
#include "cpu_attention.h"

#include "cpu_features.h"
#include "simd_math.h"

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

// One task's working set: a stream of keys (a chunk of a group's prefix, or one row's suffix) against the
// queries that read it, for every kv head: queries (pre-scaled; row-major and transposed), running softmax
// state, and one tile's row pointers.
struct Scratch {
  std::vector<float> q, qt, acc, mrun, lrun, alpha, s, kf, vf, zero;
  std::vector<const float *> kr, vr;  // the tile's rows for one head: into the fp32 pool, or into kf / vf (bf16)
  int64_t m = 0, mp = 0;  // queries per kv head, padded to 16
  void reset(int64_t hkv, int64_t m_count, int64_t d) {
    m = m_count;
    mp = (m + 15) / 16 * 16;
    q.assign(hkv * m * d, 0.0f);
    qt.assign(hkv * d * mp, 0.0f);
    acc.assign(hkv * m * d, 0.0f);
    mrun.assign(hkv * (mp + 16), kNegInf);
    lrun.assign(hkv * (mp + 16), 0.0f);
    alpha.assign(hkv * (mp + 16), 0.0f);
    s.assign(kTile * mp, 0.0f);
    kf.resize(kTile * hkv * d);
    vf.resize(kTile * hkv * d);
    zero.assign(d, 0.0f);
    kr.resize(kTile);
    vr.resize(kTile);
  }
};

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
#if STEP3VL_X86
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

#endif  // STEP3VL_X86

// ---- tasks ------------------------------------------------------------------------------------------------
// A task streams one range of keys for all kv heads, so it reads whole [token, Hkv, D] rows of the pool
// (contiguous within a block) instead of one head's slice of each. Prefixes and suffixes are split into
// chunks of kChunk tokens (the threads share a long prefix, or one long generation); every task leaves a
// partial (max, sum, unnormalized output) per query it serves, and a last pass merges each row's partials in a
// fixed order (its group's prefix chunks, then its suffix chunks), so a row's result never depends on the
// rest of the batch.
constexpr int64_t kChunk = 4 * kTile;

struct Partials {  // entries: one per (task, row of the task, q head); acc holds D floats per entry
  std::vector<float> m, l, acc;
};

struct Item {
  int64_t group_or_row, t0, t1;  // a group's prefix tokens [t0, t1), or a row's suffix tokens
  bool suffix;
  int64_t offset;  // its first partial entry
};

struct Task {
  const CascadeDecodeArgs &a;
  bool simd;

  // Element offsets of tokens [t0, t0 + n) of a block table (head 0) in the pool.
  void tile_offsets(const int32_t *table, int64_t t0, int n, int64_t *at) const {
    const int64_t bs = a.block_size, row = a.num_kv_heads * a.head_dim;
    int64_t blk = t0 / bs, off = t0 % bs;  // walk the table: no division per token
    for (int j = 0; j < n; ++j, ++off) {
      if (off == bs) {
        off = 0;
        ++blk;
      }
      at[j] = (table[blk] * bs + off) * row;
    }
  }

  void prefetch(const int64_t *at, int n) const {
    const int64_t es = a.kv_bf16 ? 2 : 4, bytes = a.num_kv_heads * a.head_dim * es;
    const char *k = static_cast<const char *>(a.k_cache), *v = static_cast<const char *>(a.v_cache);
    for (int j = 0; j < n; ++j)
      for (int64_t b = 0; b < bytes; b += 64) {
        prefetch_line(k + at[j] * es + b);
        prefetch_line(v + at[j] * es + b);
      }
  }

  // Queries of `rows` (every q head), pre-scaled, grouped by kv head: q [Hkv][i * r + j][D] and transposed.
  void load_queries(const int32_t *rows, int64_t nrows, Scratch &w) const {
    const int64_t d = a.head_dim, hkv = a.num_kv_heads, r = a.num_q_heads / hkv;
    w.reset(hkv, nrows * r, d);
    for (int64_t h = 0; h < hkv; ++h)
      for (int64_t i = 0; i < nrows; ++i)
        for (int64_t j = 0; j < r; ++j) {
          const float *src = a.q + (rows[i] * a.num_q_heads + h * r + j) * d;
          const int64_t mi = i * r + j;
          float *dst = w.q.data() + (h * w.m + mi) * d;
          float *dt = w.qt.data() + h * d * w.mp + mi;
          for (int64_t c = 0; c < d; ++c) {
            dst[c] = src[c] * a.scale;
            dt[c * w.mp] = dst[c];
          }
        }
  }

  // Streams tokens [t_begin, t_end) of a block table through every head's running softmax.
  void stream(const int32_t *table, int64_t t_begin, int64_t t_end, Scratch &w) const {
    const int64_t d = a.head_dim, hkv = a.num_kv_heads, row = hkv * d, ms = w.mp + 16;
    int64_t cur[kTile];
    // Ask for the whole range (at most kChunk tokens) up front: its rows are cold (the weights streamed through
    // the caches since the last layer), so all of their fetches should be in flight at once.
    for (int64_t t0 = t_begin; t0 < t_end; t0 += kTile) {
      const int cnt = static_cast<int>(std::min<int64_t>(kTile, t_end - t0));
      tile_offsets(table, t0, cnt, cur);
      prefetch(cur, cnt);
    }
    for (int64_t t0 = t_begin; t0 < t_end; t0 += kTile) {
      const int n = static_cast<int>(std::min<int64_t>(kTile, t_end - t0));
      tile_offsets(table, t0, n, cur);
      if (a.kv_bf16)
        for (int j = 0; j < n; ++j) {
          load_row(a.k_cache, true, cur[j], row, w.kf.data() + j * row);
          load_row(a.v_cache, true, cur[j], row, w.vf.data() + j * row);
        }
      for (int64_t h = 0; h < hkv; ++h) {
        for (int j = 0; j < n; ++j) {
          w.kr[j] = (a.kv_bf16 ? w.kf.data() + j * row : static_cast<const float *>(a.k_cache) + cur[j]) + h * d;
          w.vr[j] = (a.kv_bf16 ? w.vf.data() + j * row : static_cast<const float *>(a.v_cache) + cur[j]) + h * d;
        }
        for (int j = n; j < kTile; ++j) w.kr[j] = w.vr[j] = w.zero.data();
        float *acc = w.acc.data() + h * w.m * d, *mrun = w.mrun.data() + h * ms, *lrun = w.lrun.data() + h * ms;
#if STEP3VL_X86
        if (simd) {
          tile_avx512(w.qt.data() + h * d * w.mp, static_cast<int>(w.m), d, w.kr.data(), w.vr.data(), n,
                      w.s.data(), w.alpha.data() + h * ms, acc, mrun, lrun);
          continue;
        }
#endif
        tile_portable(w.q.data() + h * w.m * d, static_cast<int>(w.m), d, w.kr.data(), w.vr.data(), n, acc, mrun,
                      lrun);
      }
    }
  }

  // Copies the task's state into its partial entries: offset + (row index within the task) * Hq + q head.
  void store(int64_t nrows, const Scratch &w, int64_t offset, Partials &p) const {
    const int64_t d = a.head_dim, hkv = a.num_kv_heads, hq = a.num_q_heads, r = hq / hkv, ms = w.mp + 16;
    for (int64_t h = 0; h < hkv; ++h)
      for (int64_t i = 0; i < nrows; ++i)
        for (int64_t j = 0; j < r; ++j) {
          const int64_t mi = i * r + j, at = offset + i * hq + h * r + j;
          p.m[at] = w.mrun[h * ms + mi];
          p.l[at] = w.lrun[h * ms + mi];
          std::copy_n(w.acc.data() + (h * w.m + mi) * d, d, p.acc.data() + at * d);
        }
  }

  // out[b, :] = merge of the row's partials by their maxima (an empty part has l = 0). `entries` lists the
  // first entry of each of the row's parts, in merge order.
  void merge(int64_t b, const int64_t *entries, int64_t parts, const Partials &p) const {
    const int64_t d = a.head_dim, hq = a.num_q_heads;
    for (int64_t h = 0; h < hq; ++h) {
      float mx = kNegInf;
      for (int64_t i = 0; i < parts; ++i)
        if (p.l[entries[i] + h] > 0.0f) mx = std::max(mx, p.m[entries[i] + h]);
      float *dst = a.out + (b * hq + h) * d;
      std::fill(dst, dst + d, 0.0f);
      if (mx == kNegInf) continue;  // no keys: output 0, as the reference
      float total = 0.0f;
      for (int64_t i = 0; i < parts; ++i) {
        const int64_t at = entries[i] + h;
        if (p.l[at] <= 0.0f) continue;
        const float wgt = std::exp(p.m[at] - mx);
        total += p.l[at] * wgt;
        const float *src = p.acc.data() + at * d;
        for (int64_t c = 0; c < d; ++c) dst[c] += src[c] * wgt;
      }
      const float inv = 1.0f / total;
      for (int64_t c = 0; c < d; ++c) dst[c] *= inv;
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

bool has_avx512() {
#if STEP3VL_X86
  return __builtin_cpu_supports("avx512f");
#else
  return false;
#endif
}

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
  const int64_t hq = a.num_q_heads;
  // Work items and where their partials go; then, per row, the first entry of each of its parts.
  std::vector<Item> items;
  std::vector<int64_t> pos(a.batch, 0), group_of(a.batch, 0), group_first(a.num_groups + 1, 0);
  int64_t entries = 0;
  for (int64_t g = 0; g < a.num_groups; ++g) {
    group_first[g] = static_cast<int64_t>(items.size());
    const int64_t nrows = a.group_ptr[g + 1] - a.group_ptr[g];
    for (int64_t i = 0; i < nrows; ++i) {
      pos[a.group_rows[a.group_ptr[g] + i]] = i;
      group_of[a.group_rows[a.group_ptr[g] + i]] = g;
    }
    if (nrows == 0) continue;
    for (int64_t t0 = 0; t0 < a.prefix_lens[g]; t0 += kChunk, entries += nrows * hq)
      items.push_back({g, t0, std::min<int64_t>(t0 + kChunk, a.prefix_lens[g]), false, entries});
  }
  group_first[a.num_groups] = static_cast<int64_t>(items.size());
  std::vector<int64_t> row_first(a.batch + 1, 0);
  for (int64_t b = 0; b < a.batch; ++b) {
    row_first[b] = static_cast<int64_t>(items.size());
    for (int64_t t0 = 0; t0 < a.suffix_lens[b]; t0 += kChunk, entries += hq)
      items.push_back({b, t0, std::min<int64_t>(t0 + kChunk, a.suffix_lens[b]), true, entries});
  }
  row_first[a.batch] = static_cast<int64_t>(items.size());
  thread_local Partials tls;  // reused across calls; this thread's, shared with the workers below by reference
  Partials &p = tls;
  p.m.resize(entries);
  p.l.resize(entries);
  p.acc.resize(entries * a.head_dim);
  const int n_items = static_cast<int>(items.size());
  // OpenMP, so the tasks run on the same runtime and threads as torch's intra-op pool (torch ships
  // libgomp.so.1 and the loader keeps one copy per process): a second pool would fight torch's spinning
  // workers for the cores.
#pragma omp parallel
  {
    thread_local Scratch w;  // reused across calls: no allocation per tile or per layer
#pragma omp for schedule(dynamic, 1)
    for (int t = 0; t < n_items; ++t) {
      const Item &it = items[t];
      if (!it.suffix) {
        const int64_t g = it.group_or_row, nrows = a.group_ptr[g + 1] - a.group_ptr[g];
        task.load_queries(a.group_rows + a.group_ptr[g], nrows, w);
        task.stream(a.prefix_tables + g * a.prefix_stride, it.t0, it.t1, w);
        task.store(nrows, w, it.offset, p);
      } else {
        const int32_t row = static_cast<int32_t>(it.group_or_row);
        task.load_queries(&row, 1, w);
        task.stream(a.suffix_tables + row * a.suffix_stride, it.t0, it.t1, w);
        task.store(1, w, it.offset, p);
      }
    }
    std::vector<int64_t> parts;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < a.batch; ++b) {
      parts.clear();
      const int64_t g = group_of[b];
      for (int64_t i = group_first[g]; i < group_first[g + 1]; ++i) parts.push_back(items[i].offset + pos[b] * hq);
      for (int64_t i = row_first[b]; i < row_first[b + 1]; ++i) parts.push_back(items[i].offset);
      task.merge(b, parts.data(), static_cast<int64_t>(parts.size()), p);
    }
  }
}

}  // namespace step3vl::cpu

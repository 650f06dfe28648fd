// Paged decode attention (one query token per sequence), GQA, fp16 / bf16 in, fp32 accumulation, online
// softmax in base 2 (q pre-scaled by scale * log2 e; the LSE handed out is natural log).
// Grid: x = kv head x chunk of its q heads, y = sequence, z = split of the context. Block: 4 warps.
// Each lane holds 8 elements (16 bytes) of head_dim, so a token is read by D/8 lanes ("a group") and a warp
// reads 256/D tokens at once, U tokens per group in flight. Every group keeps its own online-softmax
// state per q head; groups merge through shuffles, then warps through shared memory.
// One split: the result goes straight to `out` (and `lse`). Several: each split writes a normalized fp32
// partial and its base-2 LSE, and paged_decode_merge_* combines them.
#include "paged_decode.h"

namespace step3vl {

constexpr int kWarps = 4;
constexpr int kVec = 8;  // 16-bit elements per 16-byte access
constexpr unsigned kFullMask = 0xffffffffu;
constexpr float kLn2 = 0.69314718055994530942f;
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

// Tokens per lane group per round (U). Measured on an H100 (bf16, D 128, 64 x 4K context): with 4 q heads per
// kv head U=2 reached 58% of the copy bandwidth, U=1 50%, U=4 37%, U=8 38% (registers vs resident CTAs); with 8,
// U=4 29% and U=2 25%. Overridable for tuning.
#ifndef STEP3VL_PD_UNROLL_SMALL_G
#define STEP3VL_PD_UNROLL_SMALL_G 2
#endif
#ifndef STEP3VL_PD_UNROLL_LARGE_G
#define STEP3VL_PD_UNROLL_LARGE_G 4
#endif
__host__ __device__ constexpr int unroll_for(int max_g) {
  return max_g <= 4 ? STEP3VL_PD_UNROLL_SMALL_G : STEP3VL_PD_UNROLL_LARGE_G;
}

struct alignas(16) Raw16 { uint32_t w[4]; };

// Conversions in PTX so the kernels need no CUDA headers (NVRTC compiles them as they are).
template <bool BF16> __device__ __forceinline__ float to_f32(uint16_t h);
template <> __device__ __forceinline__ float to_f32<false>(uint16_t h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}
template <> __device__ __forceinline__ float to_f32<true>(uint16_t h) { return __uint_as_float((uint32_t)h << 16); }

template <bool BF16> __device__ __forceinline__ uint16_t from_f32(float f);
template <> __device__ __forceinline__ uint16_t from_f32<false>(float f) {
  uint16_t h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}
template <> __device__ __forceinline__ uint16_t from_f32<true>(float f) {
  uint16_t h;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}

template <bool BF16>
__device__ __forceinline__ void unpack(const Raw16& r, float (&x)[kVec]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    x[2 * i] = to_f32<BF16>((uint16_t)(r.w[i] & 0xffffu));
    x[2 * i + 1] = to_f32<BF16>((uint16_t)(r.w[i] >> 16));
  }
}

// Weight of a state with running max m against the common max M (an empty state weighs 0).
__device__ __forceinline__ float rescale(float m, float M) { return m == -INFINITY ? 0.f : exp2f(m - M); }

template <bool BF16, int D, int MAX_G, int U>
__device__ void paged_decode_impl(const uint16_t* __restrict__ q, const uint16_t* __restrict__ k_cache,
                                  const uint16_t* __restrict__ v_cache, const int32_t* __restrict__ block_tables,
                                  int64_t table_stride, const int32_t* __restrict__ seq_lens,
                                  uint16_t* __restrict__ out, float* __restrict__ lse,
                                  float* __restrict__ part_out, float* __restrict__ part_lse, int32_t num_q_heads,
                                  int32_t num_kv_heads, int32_t block_size, float scale_log2,
                                  int64_t per_split) {
  constexpr int kLanesPerToken = D / kVec;
  constexpr int kGroupsPerWarp = 32 / kLanesPerToken;
  constexpr int kGroups = kWarps * kGroupsPerWarp;
  static_assert(D % kVec == 0 && 32 % kLanesPerToken == 0, "head_dim must be 8 * a power of two <= 256");
  __shared__ float s_m[kWarps][MAX_G];
  __shared__ float s_l[kWarps][MAX_G];
  __shared__ float s_acc[kWarps][MAX_G][D];

  const int group_size = num_q_heads / num_kv_heads;
  const int num_chunks = (group_size + MAX_G - 1) / MAX_G;
  const int kv_head = blockIdx.x / num_chunks, chunk = blockIdx.x % num_chunks;
  const int h0 = chunk_first_q_head(kv_head, group_size, chunk, MAX_G);
  const int nh = chunk_num_q_heads(group_size, chunk, MAX_G);
  const int b = blockIdx.y, split = blockIdx.z, num_splits = gridDim.z;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int sub = lane % kLanesPerToken;  // which 8 elements of head_dim this lane holds

  float qf[MAX_G][kVec], acc[MAX_G][kVec], m[MAX_G], l[MAX_G];
#pragma unroll
  for (int g = 0; g < MAX_G; ++g) {
    Raw16 raw = {{0u, 0u, 0u, 0u}};
    if (g < nh) raw = *reinterpret_cast<const Raw16*>(q + ((int64_t)b * num_q_heads + h0 + g) * D + sub * kVec);
    unpack<BF16>(raw, qf[g]);
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      qf[g][e] *= scale_log2;
      acc[g][e] = 0.f;
    }
    m[g] = -INFINITY;
    l[g] = 0.f;
  }

  const int32_t* row = block_tables + (int64_t)b * table_stride;
  // Clamped to the table so that unchecked lengths (validate=False) never read outside it.
  const int64_t seq_len = min64(max64(seq_lens[b], 0), table_stride * block_size);
  const Range64 r = split_range(seq_len, split, per_split);
  // The loop bound is warp-uniform (the shuffles below need every lane); tokens past the end are masked.
  // Block-table entries of the next round are fetched while this round's K/V loads are in flight.
  const int64_t first = r.begin + warp * kGroupsPerWarp + lane / kLanesPerToken;
  constexpr int64_t kStride = (int64_t)kGroups * U;
  int32_t blk[U];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int64_t t = first + (int64_t)u * kGroups;
    blk[u] = t < r.end ? row[table_column(t, block_size)] : 0;
  }
  for (int64_t base = first; base - lane / kLanesPerToken < r.end; base += kStride) {
    Raw16 kraw[U], vraw[U];
    bool valid[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t t = base + (int64_t)u * kGroups;
      valid[u] = t < r.end;
      kraw[u] = vraw[u] = Raw16{{0u, 0u, 0u, 0u}};
      if (valid[u]) {
        const int64_t off = kv_offset(slot_in_block(blk[u], t, block_size), kv_head, num_kv_heads, D) + sub * kVec;
        kraw[u] = *reinterpret_cast<const Raw16*>(k_cache + off);
        vraw[u] = *reinterpret_cast<const Raw16*>(v_cache + off);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t t = base + kStride + (int64_t)u * kGroups;
      blk[u] = t < r.end ? row[table_column(t, block_size)] : 0;
    }
#pragma unroll
    for (int g = 0; g < MAX_G; ++g) {
      float s[U];
      float m_new = m[g];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        float kf[kVec];
        unpack<BF16>(kraw[u], kf);
        float dot = 0.f;
#pragma unroll
        for (int e = 0; e < kVec; ++e) dot = fmaf(qf[g][e], kf[e], dot);
#pragma unroll
        for (int o = kLanesPerToken / 2; o > 0; o >>= 1) dot += __shfl_xor_sync(kFullMask, dot, o);
        s[u] = dot;
        if (valid[u]) m_new = fmaxf(m_new, dot);
      }
      if (m_new == -INFINITY) continue;  // no valid token for this group in this round (uniform per group)
      const float alpha = rescale(m[g], m_new);
      l[g] *= alpha;
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc[g][e] *= alpha;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        float vf[kVec];
        unpack<BF16>(vraw[u], vf);
        const float p = valid[u] ? exp2f(s[u] - m_new) : 0.f;
        l[g] += p;
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc[g][e] = fmaf(p, vf[e], acc[g][e]);
      }
      m[g] = m_new;
    }
  }

  // Merge the groups of each warp (lanes holding the same elements differ by multiples of kLanesPerToken).
#pragma unroll
  for (int o = kLanesPerToken; o < 32; o <<= 1) {
#pragma unroll
    for (int g = 0; g < MAX_G; ++g) {
      const float m_o = __shfl_xor_sync(kFullMask, m[g], o);
      const float l_o = __shfl_xor_sync(kFullMask, l[g], o);
      const float M = fmaxf(m[g], m_o);
      const float wa = rescale(m[g], M), wb = rescale(m_o, M);
      l[g] = l[g] * wa + l_o * wb;
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        const float a_o = __shfl_xor_sync(kFullMask, acc[g][e], o);
        acc[g][e] = acc[g][e] * wa + a_o * wb;
      }
      m[g] = M;
    }
  }
  if (lane < kLanesPerToken) {
#pragma unroll
    for (int g = 0; g < MAX_G; ++g) {
      if (lane == 0) {
        s_m[warp][g] = m[g];
        s_l[warp][g] = l[g];
      }
#pragma unroll
      for (int e = 0; e < kVec; ++e) s_acc[warp][g][sub * kVec + e] = acc[g][e];
    }
  }
  __syncthreads();

  // Merge the warps: one thread per (q head, element).
  for (int idx = threadIdx.x; idx < nh * D; idx += blockDim.x) {
    const int g = idx / D, d = idx % D;
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) M = fmaxf(M, s_m[w][g]);
    float L = 0.f, A = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float wt = rescale(s_m[w][g], M);
      L += s_l[w][g] * wt;
      A += s_acc[w][g][d] * wt;
    }
    const float o = L > 0.f ? A / L : 0.f;
    const float lse2 = L > 0.f ? M + log2f(L) : -INFINITY;
    const int64_t head_row = (int64_t)b * num_q_heads + h0 + g;
    if (num_splits == 1) {
      out[head_row * D + d] = from_f32<BF16>(o);
      if (lse != nullptr && d == 0) lse[head_row] = lse2 * kLn2;
    } else {
      part_out[(head_row * num_splits + split) * D + d] = o;
      if (d == 0) part_lse[head_row * num_splits + split] = lse2;
    }
  }
}

// Combine the splits of one (sequence, q head) row: grid.x = B * Hq rows, threads over head_dim.
template <bool BF16>
__device__ void paged_decode_merge_impl(const float* __restrict__ part_out, const float* __restrict__ part_lse,
                                        uint16_t* __restrict__ out, float* __restrict__ lse, int32_t num_splits,
                                        int32_t head_dim) {
  const int64_t row = blockIdx.x;
  const float* lses = part_lse + row * num_splits;
  float M = -INFINITY;
  for (int s = 0; s < num_splits; ++s) M = fmaxf(M, lses[s]);
  float L = 0.f;
  for (int s = 0; s < num_splits; ++s) L += rescale(lses[s], M);
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float A = 0.f;
    for (int s = 0; s < num_splits; ++s) A += rescale(lses[s], M) * part_out[(row * num_splits + s) * head_dim + d];
    out[row * head_dim + d] = from_f32<BF16>(L > 0.f ? A / L : 0.f);
  }
  if (lse != nullptr && threadIdx.x == 0) lse[row] = L > 0.f ? (M + log2f(L)) * kLn2 : -INFINITY;
}

}  // namespace step3vl

#define STEP3VL_PAGED_DECODE(DT, BF16, D, G)                                                                 \
  extern "C" __global__ void __launch_bounds__(step3vl::kWarps * 32)                                          \
      paged_decode_##DT##_d##D##_g##G(const uint16_t* q, const uint16_t* k_cache, const uint16_t* v_cache,    \
                                      const int32_t* block_tables, int64_t table_stride,                      \
                                      const int32_t* seq_lens, uint16_t* out, float* lse, float* part_out,    \
                                      float* part_lse, int32_t num_q_heads, int32_t num_kv_heads,             \
                                      int32_t block_size, float scale_log2, int64_t per_split) {              \
    step3vl::paged_decode_impl<BF16, D, G, step3vl::unroll_for(G)>(                                          \
        q, k_cache, v_cache, block_tables, table_stride, seq_lens, out, lse, part_out, part_lse, num_q_heads, \
        num_kv_heads, block_size, scale_log2, per_split);                                                    \
  }

#define STEP3VL_PAGED_DECODE_GROUPS(DT, BF16, D) \
  STEP3VL_PAGED_DECODE(DT, BF16, D, 1)           \
  STEP3VL_PAGED_DECODE(DT, BF16, D, 2)           \
  STEP3VL_PAGED_DECODE(DT, BF16, D, 4)           \
  STEP3VL_PAGED_DECODE(DT, BF16, D, 8)

#define STEP3VL_PAGED_DECODE_DIMS(DT, BF16)  \
  STEP3VL_PAGED_DECODE_GROUPS(DT, BF16, 32)  \
  STEP3VL_PAGED_DECODE_GROUPS(DT, BF16, 64)  \
  STEP3VL_PAGED_DECODE_GROUPS(DT, BF16, 128) \
  STEP3VL_PAGED_DECODE_GROUPS(DT, BF16, 256)

STEP3VL_PAGED_DECODE_DIMS(f16, false)
STEP3VL_PAGED_DECODE_DIMS(bf16, true)

extern "C" __global__ void paged_decode_merge_f16(const float* part_out, const float* part_lse, uint16_t* out,
                                                  float* lse, int32_t num_splits, int32_t head_dim) {
  step3vl::paged_decode_merge_impl<false>(part_out, part_lse, out, lse, num_splits, head_dim);
}
extern "C" __global__ void paged_decode_merge_bf16(const float* part_out, const float* part_lse, uint16_t* out,
                                                   float* lse, int32_t num_splits, int32_t head_dim) {
  step3vl::paged_decode_merge_impl<true>(part_out, part_lse, out, lse, num_splits, head_dim);
}

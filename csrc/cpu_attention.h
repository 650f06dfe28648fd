// CPU cascade (shared-prefix) decode attention over the paged KV cache: the engine's CPU decode path.
// Semantics: kernels/paged_decode_ref.py (cascade_decode). Tasks stream 256-token chunks of the pool in place
// (no dense copy of any context): a chunk of a group's shared prefix against all of the group's rows x heads
// at once (so the prefix is read once per group), or a chunk of one row's own suffix; each leaves online-softmax
// partials that a last pass merges per row in a fixed order.
#pragma once

#include <cstdint>

namespace step3vl::cpu {

struct CascadeDecodeArgs {
  const float *q = nullptr;  // [B, Hq, D] fp32, contiguous
  const void *k_cache = nullptr;  // [num_blocks, block_size, Hkv, D], fp32 or bf16 (kv_bf16)
  const void *v_cache = nullptr;
  bool kv_bf16 = false;
  int64_t num_blocks = 0, block_size = 0, num_kv_heads = 0, num_q_heads = 0, head_dim = 0;
  int64_t batch = 0, num_groups = 0;
  const int32_t *prefix_tables = nullptr;  // [G, prefix_stride] block ids
  int64_t prefix_stride = 0;
  const int32_t *prefix_lens = nullptr;  // [G] tokens
  const int32_t *group_rows = nullptr;  // [B] rows, sorted by group
  const int32_t *group_ptr = nullptr;  // [G + 1] CSR offsets into group_rows
  const int32_t *suffix_tables = nullptr;  // [B, suffix_stride] block ids
  int64_t suffix_stride = 0;
  const int32_t *suffix_lens = nullptr;  // [B] tokens
  float scale = 1.0f;
  float *out = nullptr;  // [B, Hq, D] fp32
};

// Throws std::invalid_argument naming the first inconsistent field (a block id out of range, a length past
// its table, rows not covering the batch...), so bad metadata is an error, never a wild read.
void check_cascade_decode(const CascadeDecodeArgs &a);

// One task per (group, kv head), spread over OpenMP threads. simd=false forces the portable path.
void cascade_decode(const CascadeDecodeArgs &a, bool simd);

// Whether this CPU runs the AVX-512 path.
bool has_avx512();

}  // namespace step3vl::cpu

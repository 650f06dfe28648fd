// CPU linear layer for decode-sized batches: y[M, N] = x[M, K] @ W^T in fp32 arithmetic, with W kept in
// bf16 when the checkpoint's weights are bf16 (the upcast is exact, so this is the fp32 result with half the
// weight bytes to stream per step). Semantics: kernels/linear_cpu.py (linear_packed_ref).
#pragma once

#include <cstdint>

namespace step3vl::cpu {

// Weights packed as [ceil(N / 16), K, 16]: 16 consecutive output columns per k, zero-padded past N.
constexpr int kLinearColumns = 16;

struct PackedLinearArgs {
  const float *x = nullptr;  // [M, K] fp32, contiguous
  const void *w = nullptr;  // packed weights, bf16 (w_bf16) or fp32
  bool w_bf16 = true;
  const float *bias = nullptr;  // [N] or null
  int64_t m = 0, k = 0, n = 0;
  float *y = nullptr;  // [M, N] fp32
};

void linear_packed(const PackedLinearArgs &a, bool simd);

}  // namespace step3vl::cpu

// CPU linear layer for decode-sized batches: y[M, N] = x[M, K] @ W^T in fp32 arithmetic, with W kept in
// bf16 when the checkpoint's weights are bf16 (the upcast is exact, so this is the fp32 result with half the
// weight bytes to stream per step). Semantics: kernels/linear_cpu.py (linear_packed_ref).
#pragma once

#include <cstdint>

namespace step3vl::cpu {

constexpr int kLinearColumns = 16;  // output columns per packed block (zero-padded past N)
constexpr int kAmxK = 32;  // k per AMX tile row

// How the weights are packed (kernels/linear_cpu.py: pack_weight):
// kF32, kBf16: [ceil(N / 16), K, 16], 16 consecutive output columns per k (the AVX-512 FMA kernel);
// kBf16Amx: [ceil(N / 16), ceil(K / 32) * 16, 16, 2], k-pairs interleaved (the AMX tile layout), K zero-padded.
enum WeightLayout : int { kF32 = 0, kBf16 = 1, kBf16Amx = 2 };

struct PackedLinearArgs {
  const float *x = nullptr;  // [M, K] fp32, contiguous
  const void *w = nullptr;  // packed weights
  int layout = kBf16;
  const float *bias = nullptr;  // [N] or null
  int64_t m = 0, k = 0, n = 0;
  float *y = nullptr;  // [M, N] fp32
};

// simd=false forces the portable path (any layout).
void linear_packed(const PackedLinearArgs &a, bool simd);

// AMX-BF16 usable here: the CPU has it and the kernel granted this process the tile state (asked once).
bool has_amx();

// kBf16Amx weights: x is split into three bf16 terms (x = hi + mid + lo to ~2^-27 relative) and each term
// multiplies the exact bf16 weights on the AMX tiles with fp32 accumulation: an fp32-accurate product (not
// bit-identical to an FMA loop: the sums are ordered differently) at tile speed.
void linear_amx(const PackedLinearArgs &a);

}  // namespace step3vl::cpu

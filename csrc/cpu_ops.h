// The decoder's small per-token ops on the CPU, fp32, one call each instead of several torch ops: at decode
// batch sizes the dispatch of each op costs more than its arithmetic. Semantics: kernels/decoder_ops_cpu.py.
#pragma once

#include <cstdint>

namespace step3vl::cpu {

// out[r] = w * (x[r] / sqrt(mean(x[r]^2) + eps)) for rows of width h (out may alias x).
void rms_norm(const float *x, const float *w, float eps, int64_t rows, int64_t h, float *out);

// In place on x [T, heads, D] (row stride `stride` between tokens): rotate-half RoPE with cos/sin [T, D].
void rope_rotate_half(float *x, int64_t tokens, int64_t heads, int64_t d, int64_t stride, const float *cos,
                      const float *sin);

// out[t, i] = silu(gate_up[t, i]) * gate_up[t, inter + i] for gate_up [T, 2 * inter] (gate first, then up).
void silu_mul(const float *gate, const float *up, int64_t tokens, int64_t inter, int64_t in_stride, float *out);

}  // namespace step3vl::cpu

// The whole Qwen3 decoder stack for one pure-decode step on the CPU, in one call: per layer RMSNorm ->
// q/k/v (packed linears) -> per-head q/k RMSNorm -> rotary -> KV write -> cascade decode attention -> o_proj
// + residual -> RMSNorm -> gate/up -> SiLU-mul -> down + residual. The same arithmetic as the module path
// (step3vl/model/decoder.py with the engine's native modules), minus the per-op Python dispatch, which at
// decode batch sizes costs as much as the small ops themselves. fp32 activations and KV cache.
#pragma once

#include <cstdint>

#include "cpu_attention.h"

namespace step3vl::cpu {

// Per layer, as addresses: the norms are fp32 [hidden] / [head_dim]; each linear is a packed weight
// (cpu_linear.h) with its own WeightLayout code; the caches are fp32 [num_blocks, block_size, Hkv, D].
enum LayerSlot : int {
  kInNorm, kQ, kK, kV, kQNorm, kKNorm, kO, kPostNorm, kGate, kUp, kDown, kKCache, kVCache,
  kQLayout, kKLayout, kVLayout, kOLayout, kGateLayout, kUpLayout, kDownLayout, kLayerSlots
};

struct DecoderDims {
  int64_t layers = 0, hidden = 0, heads = 0, kv_heads = 0, head_dim = 0, inter = 0;
  float eps = 1e-6f;
};

// x [B, hidden] in/out (embeddings in, the last layer's output out); cos/sin [B, head_dim]; slots [B] cache
// slots of the new tokens; attn carries the step's cascade metadata (q/out/caches are filled per layer).
void decode_stack(const DecoderDims &dims, const int64_t *layer_table, float *x, int64_t batch, const float *cos,
                  const float *sin, const int64_t *slots, CascadeDecodeArgs attn);

}  // namespace step3vl::cpu

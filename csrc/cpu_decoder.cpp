// See cpu_decoder.h.
#include "cpu_decoder.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu_linear.h"
#include "cpu_ops.h"

namespace step3vl::cpu {
namespace {

template <typename T>
T *at(const int64_t *row, int slot) {
  return reinterpret_cast<T *>(static_cast<uintptr_t>(row[slot]));
}

void linear(const float *x, int64_t rows, int64_t k, const int64_t *row, int w_slot, int layout_slot, int64_t n,
            float *y) {
  PackedLinearArgs a;
  a.x = x;
  a.w = at<const void>(row, w_slot);
  a.layout = static_cast<int>(row[layout_slot]);
  a.m = rows;
  a.k = k;
  a.n = n;
  a.y = y;
  linear_packed(a, true);
}

struct Buffers {
  std::vector<float> h, q, k, v, attn, o, gate, up, act;
};

}  // namespace

void decode_stack(const DecoderDims &d, const int64_t *layer_table, float *x, int64_t b, const float *cos,
                  const float *sin, const int64_t *slots, CascadeDecodeArgs attn) {
  const int64_t hid = d.hidden, hd = d.head_dim, qn = d.heads * hd, kvn = d.kv_heads * hd;
  thread_local Buffers buf;  // the calling thread's, reused across steps
  buf.h.resize(b * hid);
  buf.q.resize(b * qn);
  buf.k.resize(b * kvn);
  buf.v.resize(b * kvn);
  buf.attn.resize(b * qn);
  buf.o.resize(b * hid);
  buf.gate.resize(b * d.inter);
  buf.up.resize(b * d.inter);
  buf.act.resize(b * d.inter);
  attn.q = buf.q.data();
  attn.out = buf.attn.data();
  attn.kv_bf16 = false;
  for (int64_t l = 0; l < d.layers; ++l) {
    const int64_t *row = layer_table + l * kLayerSlots;
    rms_norm(x, at<const float>(row, kInNorm), d.eps, b, hid, buf.h.data());
    linear(buf.h.data(), b, hid, row, kQ, kQLayout, qn, buf.q.data());
    linear(buf.h.data(), b, hid, row, kK, kKLayout, kvn, buf.k.data());
    linear(buf.h.data(), b, hid, row, kV, kVLayout, kvn, buf.v.data());
    rms_norm(buf.q.data(), at<const float>(row, kQNorm), d.eps, b * d.heads, hd, buf.q.data());
    rms_norm(buf.k.data(), at<const float>(row, kKNorm), d.eps, b * d.kv_heads, hd, buf.k.data());
    rope_rotate_half(buf.q.data(), b, d.heads, hd, qn, cos, sin);
    rope_rotate_half(buf.k.data(), b, d.kv_heads, hd, kvn, cos, sin);
    float *kc = at<float>(row, kKCache), *vc = at<float>(row, kVCache);
    for (int64_t i = 0; i < b; ++i) {
      std::memcpy(kc + slots[i] * kvn, buf.k.data() + i * kvn, kvn * sizeof(float));
      std::memcpy(vc + slots[i] * kvn, buf.v.data() + i * kvn, kvn * sizeof(float));
    }
    attn.k_cache = kc;
    attn.v_cache = vc;
    cascade_decode(attn, true);
    linear(buf.attn.data(), b, qn, row, kO, kOLayout, hid, buf.o.data());
    for (int64_t i = 0; i < b * hid; ++i) x[i] += buf.o[i];
    rms_norm(x, at<const float>(row, kPostNorm), d.eps, b, hid, buf.h.data());
    linear(buf.h.data(), b, hid, row, kGate, kGateLayout, d.inter, buf.gate.data());
    linear(buf.h.data(), b, hid, row, kUp, kUpLayout, d.inter, buf.up.data());
    silu_mul(buf.gate.data(), buf.up.data(), b, d.inter, d.inter, buf.act.data());
    linear(buf.act.data(), b, d.inter, row, kDown, kDownLayout, hid, buf.o.data());
    for (int64_t i = 0; i < b * hid; ++i) x[i] += buf.o[i];
  }
}

}  // namespace step3vl::cpu

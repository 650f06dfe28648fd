// Python bindings of the CPU kernels. Tensors cross as (data pointer, shape) from the step3vl_kernels
// wrappers, which check dtype, device and contiguity and keep the tensors alive for the call.
// std::invalid_argument from the checks reaches Python as ValueError (pybind11's default translation).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cpu_attention.h"
#include "cpu_decoder.h"
#include "cpu_features.h"
#include "cpu_linear.h"
#include "cpu_ops.h"
#include "cpu_sampling.h"

namespace py = pybind11;

namespace {

template <typename T>
T *ptr(uint64_t address) {
  return reinterpret_cast<T *>(static_cast<uintptr_t>(address));
}

// The step's cascade metadata (tables are int32 addresses); q, out and the caches are the caller's to fill.
step3vl::cpu::CascadeDecodeArgs cascade_metadata(int64_t num_blocks, int64_t block_size, int64_t num_kv_heads,
                                                 int64_t num_q_heads, int64_t head_dim, int64_t batch,
                                                 int64_t num_groups, uint64_t prefix_tables, int64_t prefix_stride,
                                                 uint64_t prefix_lens, uint64_t group_rows, uint64_t group_ptr,
                                                 uint64_t suffix_tables, int64_t suffix_stride,
                                                 uint64_t suffix_lens, float scale) {
  step3vl::cpu::CascadeDecodeArgs a;
  a.num_blocks = num_blocks;
  a.block_size = block_size;
  a.num_kv_heads = num_kv_heads;
  a.num_q_heads = num_q_heads;
  a.head_dim = head_dim;
  a.batch = batch;
  a.num_groups = num_groups;
  a.prefix_tables = ptr<const int32_t>(prefix_tables);
  a.prefix_stride = prefix_stride;
  a.prefix_lens = ptr<const int32_t>(prefix_lens);
  a.group_rows = ptr<const int32_t>(group_rows);
  a.group_ptr = ptr<const int32_t>(group_ptr);
  a.suffix_tables = ptr<const int32_t>(suffix_tables);
  a.suffix_stride = suffix_stride;
  a.suffix_lens = ptr<const int32_t>(suffix_lens);
  a.scale = scale;
  return a;
}

}  // namespace

void bind_cpu_kernels(py::module_ &m) {
  m.def("cpu_has_avx512", &step3vl::cpu::has_avx512, "The AVX-512 paths are compiled in and this CPU runs them.");
  m.def("cpu_simd_compiled", [] { return STEP3VL_X86 == 1; }, "This build has the x86 SIMD paths.");
  m.def("cpu_has_amx", &step3vl::cpu::has_amx, "AMX-BF16 present and granted to this process.");

  m.def(
      "cpu_cascade_decode",
      [](uint64_t q, uint64_t k_cache, uint64_t v_cache, bool kv_bf16, int64_t num_blocks, int64_t block_size,
         int64_t num_kv_heads, int64_t num_q_heads, int64_t head_dim, int64_t batch, int64_t num_groups,
         uint64_t prefix_tables, int64_t prefix_stride, uint64_t prefix_lens, uint64_t group_rows,
         uint64_t group_ptr, uint64_t suffix_tables, int64_t suffix_stride, uint64_t suffix_lens, float scale,
         uint64_t out, bool simd) {
        step3vl::cpu::CascadeDecodeArgs a = cascade_metadata(
            num_blocks, block_size, num_kv_heads, num_q_heads, head_dim, batch, num_groups, prefix_tables,
            prefix_stride, prefix_lens, group_rows, group_ptr, suffix_tables, suffix_stride, suffix_lens, scale);
        a.q = ptr<const float>(q);
        a.k_cache = ptr<const void>(k_cache);
        a.v_cache = ptr<const void>(v_cache);
        a.kv_bf16 = kv_bf16;
        a.out = ptr<float>(out);
        step3vl::cpu::check_cascade_decode(a);
        py::gil_scoped_release release;
        step3vl::cpu::cascade_decode(a, simd);
      },
      py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("kv_bf16"), py::arg("num_blocks"),
      py::arg("block_size"), py::arg("num_kv_heads"), py::arg("num_q_heads"), py::arg("head_dim"),
      py::arg("batch"), py::arg("num_groups"), py::arg("prefix_tables"), py::arg("prefix_stride"),
      py::arg("prefix_lens"), py::arg("group_rows"), py::arg("group_ptr"), py::arg("suffix_tables"),
      py::arg("suffix_stride"), py::arg("suffix_lens"), py::arg("scale"), py::arg("out"),
      py::arg("simd") = true,
      "Raw-pointer entry of the CPU cascade decode; call step3vl_kernels.cascade_decode_cpu instead.");

  m.def(
      "cpu_linear_packed",
      [](uint64_t x, uint64_t w, int layout, uint64_t bias, int64_t rows, int64_t k, int64_t n, uint64_t y,
         bool simd) {
        step3vl::cpu::PackedLinearArgs a;
        a.x = ptr<const float>(x);
        a.w = ptr<const void>(w);
        a.layout = layout;
        a.bias = bias ? ptr<const float>(bias) : nullptr;
        a.m = rows;
        a.k = k;
        a.n = n;
        a.y = ptr<float>(y);
        py::gil_scoped_release release;
        step3vl::cpu::linear_packed(a, simd);
      },
      py::arg("x"), py::arg("w"), py::arg("layout"), py::arg("bias"), py::arg("rows"), py::arg("k"), py::arg("n"),
      py::arg("y"), py::arg("simd") = true,
      "Raw-pointer entry of the CPU packed linear; call step3vl_kernels.linear_cpu.linear_packed instead.");

  m.def(
      "cpu_sampling_uniforms",
      [](uint64_t keys, int64_t rows, int64_t vocab, uint64_t out) {
        py::gil_scoped_release release;
        step3vl::cpu::sampling_uniforms(ptr<const int64_t>(keys), rows, vocab, ptr<double>(out));
      },
      py::arg("keys"), py::arg("rows"), py::arg("vocab"), py::arg("out"),
      "Raw-pointer entry of the sampler's uniforms; call step3vl_kernels.sampling_cpu.uniforms instead.");

  m.def(
      "cpu_sampling_stream_keys",
      [](uint64_t seeds, uint64_t samples, uint64_t steps, int64_t rows, uint64_t keys) {
        step3vl::cpu::sampling_stream_keys(ptr<const int64_t>(seeds), ptr<const int64_t>(samples),
                                           ptr<const int64_t>(steps), rows, ptr<int64_t>(keys));
      },
      py::arg("seeds"), py::arg("samples"), py::arg("steps"), py::arg("rows"), py::arg("keys"));
  m.def(
      "cpu_rms_norm",
      [](uint64_t x, uint64_t w, float eps, int64_t rows, int64_t h, uint64_t out) {
        step3vl::cpu::rms_norm(ptr<const float>(x), ptr<const float>(w), eps, rows, h, ptr<float>(out));
      },
      py::arg("x"), py::arg("w"), py::arg("eps"), py::arg("rows"), py::arg("h"), py::arg("out"));
  m.def(
      "cpu_rope_rotate_half",
      [](uint64_t x, int64_t tokens, int64_t heads, int64_t d, int64_t stride, uint64_t cos, uint64_t sin) {
        step3vl::cpu::rope_rotate_half(ptr<float>(x), tokens, heads, d, stride, ptr<const float>(cos),
                                       ptr<const float>(sin));
      },
      py::arg("x"), py::arg("tokens"), py::arg("heads"), py::arg("d"), py::arg("stride"), py::arg("cos"),
      py::arg("sin"));
  m.def(
      "cpu_silu_mul",
      [](uint64_t gate, uint64_t up, int64_t tokens, int64_t inter, int64_t in_stride, uint64_t out) {
        step3vl::cpu::silu_mul(ptr<const float>(gate), ptr<const float>(up), tokens, inter, in_stride,
                               ptr<float>(out));
      },
      py::arg("gate"), py::arg("up"), py::arg("tokens"), py::arg("inter"), py::arg("in_stride"), py::arg("out"));

  m.attr("CPU_DECODER_LAYER_SLOTS") = static_cast<int>(step3vl::cpu::kLayerSlots);
  m.def(
      "cpu_decode_stack",
      [](int64_t layers, int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t inter,
         float eps, float scale, uint64_t layer_table, uint64_t x, int64_t batch, uint64_t cos, uint64_t sin,
         uint64_t slots, int64_t num_blocks, int64_t block_size, int64_t num_groups, uint64_t prefix_tables,
         int64_t prefix_stride, uint64_t prefix_lens, uint64_t group_rows, uint64_t group_ptr,
         uint64_t suffix_tables, int64_t suffix_stride, uint64_t suffix_lens) {
        step3vl::cpu::DecoderDims d;
        d.layers = layers;
        d.hidden = hidden;
        d.heads = heads;
        d.kv_heads = kv_heads;
        d.head_dim = head_dim;
        d.inter = inter;
        d.eps = eps;
        const step3vl::cpu::CascadeDecodeArgs a = cascade_metadata(
            num_blocks, block_size, kv_heads, heads, head_dim, batch, num_groups, prefix_tables, prefix_stride,
            prefix_lens, group_rows, group_ptr, suffix_tables, suffix_stride, suffix_lens, scale);
        step3vl::cpu::check_cascade_decode(a);
        const int64_t *sl = ptr<const int64_t>(slots);
        for (int64_t i = 0; i < batch; ++i)
          if (sl[i] < 0 || sl[i] >= num_blocks * block_size)
            throw std::invalid_argument("cpu_decode_stack: slot " + std::to_string(sl[i]) + " of row " +
                                        std::to_string(i) + " outside the pool");
        py::gil_scoped_release release;
        step3vl::cpu::decode_stack(d, ptr<const int64_t>(layer_table), ptr<float>(x), batch, ptr<const float>(cos),
                                   ptr<const float>(sin), sl, a);
      },
      "Raw-pointer entry of the fused CPU decode step; used by step3vl.engine.cpu_decode.");
}

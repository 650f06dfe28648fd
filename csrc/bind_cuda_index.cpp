// Host builds of the CUDA kernels' index math (csrc/cuda/*.h), exposed as step3vl_native.cuda_index so the
// CPU tests run the very functions the kernels run.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "cuda/block_copy.h"
#include "cuda/compaction.h"
#include "cuda/paged_decode.h"

namespace py = pybind11;
using I32Array = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

namespace {

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument(what);
}

py::tuple span_tuple(const step3vl::MessageSpan& s) {
  return py::make_tuple(s.start, s.len, s.closed, s.truncated);
}

// The whole compaction on the host with the kernel's pieces: per-row search + span, the per-thread segments of
// the block scan (for `threads` threads), and the packing.
py::tuple compact_messages_host(const I32Array& tokens, const I32Array& lengths, const I32Array& marker,
                                int64_t max_tokens, bool keep_unclosed, int64_t threads) {
  require(tokens.ndim() == 2, "tokens must be 2-D [K, L]");
  require(lengths.ndim() == 1 && lengths.shape(0) == tokens.shape(0), "lengths must be [K]");
  require(marker.ndim() == 1 && marker.shape(0) > 0, "marker must be a non-empty 1-D array");
  require(threads > 0, "threads must be positive");
  const int64_t K = tokens.shape(0), L = tokens.shape(1);
  const int32_t m = (int32_t)marker.shape(0);
  const int32_t* tok = tokens.data();
  const int32_t* len = lengths.data();
  std::vector<step3vl::MessageSpan> spans(K);
  for (int64_t k = 0; k < K; ++k) {
    require(len[k] >= 0 && len[k] <= L, "lengths[" + std::to_string(k) + "] out of [0, L]");
    const int64_t found = step3vl::last_marker_start(tok + k * L, len[k], marker.data(), m);
    spans[k] = step3vl::message_span(found, m, len[k], max_tokens, keep_unclosed);
  }
  std::vector<int64_t> thread_prefix(threads + 1, 0);
  for (int64_t t = 0; t < threads; ++t) {
    const step3vl::Range64 seg = step3vl::thread_segment(K, t, threads);
    int64_t local = 0;
    for (int64_t k = seg.begin; k < seg.end; ++k) local += spans[k].len;
    thread_prefix[t + 1] = thread_prefix[t] + local;
  }
  py::array_t<int32_t> offsets(K + 1);
  auto off = offsets.mutable_unchecked<1>();
  off(0) = 0;
  for (int64_t t = 0; t < threads; ++t) {
    const step3vl::Range64 seg = step3vl::thread_segment(K, t, threads);
    int64_t running = thread_prefix[t];
    for (int64_t k = seg.begin; k < seg.end; ++k) off(k + 1) = (int32_t)(running += spans[k].len);
  }
  py::array_t<int32_t> packed(off(K));
  py::array_t<bool> closed(K), truncated(K);
  auto out = packed.mutable_unchecked<1>();
  auto c = closed.mutable_unchecked<1>();
  auto tr = truncated.mutable_unchecked<1>();
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t i = 0; i < spans[k].len; ++i) out(off(k) + i) = tok[k * L + spans[k].start + i];
    c(k) = spans[k].closed;
    tr(k) = spans[k].truncated;
  }
  return py::make_tuple(packed, offsets, closed, truncated);
}

// Slots of tokens 0 .. seq_lens[b]-1 of every sequence, concatenated (the kernel's token -> slot mapping).
py::array_t<int64_t> slot_mapping(const I32Array& block_tables, const I32Array& seq_lens, int32_t block_size) {
  require(block_tables.ndim() == 2, "block_tables must be 2-D [B, M]");
  require(seq_lens.ndim() == 1 && seq_lens.shape(0) == block_tables.shape(0), "seq_lens must be [B]");
  require(block_size > 0, "block_size must be positive");
  const int64_t B = block_tables.shape(0), M = block_tables.shape(1);
  std::vector<int64_t> slots;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = seq_lens.data()[b];
    require(n >= 0 && step3vl::ceil_div64(n, block_size) <= M,
            "seq_lens[" + std::to_string(b) + "] needs more blocks than the table row holds");
    for (int64_t t = 0; t < n; ++t) slots.push_back(step3vl::token_slot(block_tables.data() + b * M, t, block_size));
  }
  py::array_t<int64_t> result((py::ssize_t)slots.size());
  std::copy(slots.begin(), slots.end(), result.mutable_data());
  return result;
}

}  // namespace

void bind_cuda_index(py::module_& m) {
  py::module_ ci = m.def_submodule("cuda_index", "Host builds of the CUDA kernels' index math (csrc/cuda/*.h).");

  ci.def("copy_vec_width", [](uint64_t bits) { return step3vl::copy_vec_width(bits); }, py::arg("bits"));
  ci.def("block_byte_offset", &step3vl::block_byte_offset, py::arg("block"), py::arg("bytes_per_block"));
  ci.def(
      "copy_chunk_range",
      [](int64_t nvec, int64_t chunk, int64_t per_chunk) {
        const step3vl::Range64 r = step3vl::copy_chunk_range(nvec, chunk, per_chunk);
        return std::make_tuple(r.begin, r.end);
      },
      py::arg("nvec"), py::arg("chunk"), py::arg("vecs_per_chunk"));

  ci.def(
      "last_marker_start",
      [](const I32Array& row, int64_t length, const I32Array& marker) {
        require(length >= 0 && length <= row.size(), "length out of [0, len(row)]");
        require(marker.size() > 0, "marker must be non-empty");
        return step3vl::last_marker_start(row.data(), length, marker.data(), (int32_t)marker.size());
      },
      py::arg("row"), py::arg("length"), py::arg("marker"));
  ci.def(
      "message_span",
      [](int64_t marker_start, int32_t marker_len, int64_t length, int64_t max_tokens, bool keep_unclosed) {
        return span_tuple(step3vl::message_span(marker_start, marker_len, length, max_tokens, keep_unclosed));
      },
      py::arg("marker_start"), py::arg("marker_len"), py::arg("length"), py::arg("max_tokens"),
      py::arg("keep_unclosed"), "-> (start, len, closed, truncated)");
  ci.def(
      "thread_segment",
      [](int64_t n, int64_t t, int64_t threads) {
        const step3vl::Range64 r = step3vl::thread_segment(n, t, threads);
        return std::make_tuple(r.begin, r.end);
      },
      py::arg("n"), py::arg("thread"), py::arg("threads"));
  ci.def("compact_messages_host", &compact_messages_host, py::arg("tokens"), py::arg("lengths"), py::arg("marker"),
         py::arg("max_tokens"), py::arg("keep_unclosed"), py::arg("threads") = 1024,
         "-> (tokens, offsets, closed, truncated), the kernel's algorithm run on the host");

  ci.def("slot_mapping", &slot_mapping, py::arg("block_tables"), py::arg("seq_lens"), py::arg("block_size"));
  ci.def("kv_offset", &step3vl::kv_offset, py::arg("slot"), py::arg("kv_head"), py::arg("num_kv_heads"),
         py::arg("head_dim"));
  ci.def("tokens_per_split", &step3vl::tokens_per_split, py::arg("max_context"), py::arg("num_splits"),
         py::arg("block_size"));
  ci.def(
      "split_range",
      [](int64_t seq_len, int64_t split, int64_t per_split) {
        const step3vl::Range64 r = step3vl::split_range(seq_len, split, per_split);
        return std::make_tuple(r.begin, r.end);
      },
      py::arg("seq_len"), py::arg("split"), py::arg("per_split"));
  ci.def("chunk_first_q_head", &step3vl::chunk_first_q_head, py::arg("kv_head"), py::arg("group"), py::arg("chunk"),
         py::arg("chunk_size"));
  ci.def("chunk_num_q_heads", &step3vl::chunk_num_q_heads, py::arg("group"), py::arg("chunk"), py::arg("chunk_size"));
}

// Python bindings of step3vl::BlockManager (see block_manager.h for the semantics).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "block_manager.h"

namespace py = pybind11;
using step3vl::BlockManager;

namespace {

// Salts are arbitrary Python ints (image hashes, request ids); any width is folded to 64 bits.
uint64_t to_salt(const py::int_ &salt) {
  const unsigned long long v = PyLong_AsUnsignedLongLongMask(salt.ptr());
  if (v == static_cast<unsigned long long>(-1) && PyErr_Occurred()) throw py::error_already_set();
  return static_cast<uint64_t>(v);
}

}  // namespace

void bind_block_manager(py::module_ &m) {
  // PoolExhausted subclasses RuntimeError, so the engine can catch exhaustion alone.
  py::register_local_exception<step3vl::PoolExhausted>(m, "PoolExhausted", PyExc_RuntimeError);
  py::register_local_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const step3vl::UnknownSequence &e) {
      py::set_error(PyExc_KeyError, e.what());
    }
  });

  py::class_<BlockManager>(m, "BlockManager",
                           "Paged KV-cache bookkeeping: ref-counted blocks, chained-hash prefix cache with LRU "
                           "eviction, fork with copy-on-write, pinned prefixes. Hands out block ids only.")
      .def(py::init<int64_t, int64_t>(), py::arg("num_blocks"), py::arg("block_size"))
      .def_property_readonly("num_blocks", &BlockManager::num_blocks)
      .def_property_readonly("block_size", &BlockManager::block_size)
      .def_property_readonly("prefix_hit_tokens", &BlockManager::prefix_hit_tokens,
                             "Running total of prompt tokens served from the prefix cache.")
      .def("num_free", &BlockManager::num_free, "Blocks neither referenced nor pinned (free + evictable cached).")
      .def("num_cached", &BlockManager::num_cached, "Unreferenced blocks holding a prefix-cache entry (evictable).")
      .def("num_used", &BlockManager::num_used, "Blocks with ref_count > 0.")
      .def("ref_count", &BlockManager::ref_count, py::arg("block"))
      .def("can_allocate", &BlockManager::can_allocate, py::arg("num_tokens"),
           "Would a new sequence of num_tokens fit, ignoring prefix-cache hits.")
      .def(
          "allocate",
          [](BlockManager &self, int64_t seq_id, const std::vector<int64_t> &tokens, const py::int_ &salt) {
            return self.allocate(seq_id, tokens, to_salt(salt));
          },
          py::arg("seq_id"), py::arg("tokens"), py::arg("salt") = 0,
          "Create a sequence holding its prompt; returns the number of leading tokens already cached.")
      .def("mark_computed", &BlockManager::mark_computed, py::arg("seq_id"), py::arg("num_tokens"),
           "The KV of the first num_tokens tokens is written: register its full blocks in the prefix cache.")
      .def("fork", &BlockManager::fork, py::arg("parent_seq_id"), py::arg("child_seq_id"))
      .def("append_slot", &BlockManager::append_slot, py::arg("seq_id"), py::arg("token"),
           "Append one token; returns (slot, copy_src_block, copy_dst_block), the copy being (-1, -1) if none.")
      .def(
          "append_slots",
          [](BlockManager &self, const std::vector<int64_t> &seq_ids, const std::vector<int64_t> &tokens) {
            auto r = self.append_slots(seq_ids, tokens);
            return py::make_tuple(r.slots, r.copy_srcs, r.copy_dsts);
          },
          py::arg("seq_ids"), py::arg("tokens"),
          "One decode step, all or nothing: returns (slots, copy_srcs, copy_dsts); slots has one entry per "
          "sequence, the copy lists hold only the copy-on-write block copies to perform.")
      .def("can_append", &BlockManager::can_append, py::arg("seq_ids"))
      .def("free", &BlockManager::free, py::arg("seq_id"))
      .def("truncate", &BlockManager::truncate, py::arg("seq_id"), py::arg("num_tokens"),
           "Drop the tokens past num_tokens (rejected speculative tokens) and the blocks only they occupied; "
           "tokens of registered blocks cannot be dropped.")
      .def("block_table", &BlockManager::block_table, py::arg("seq_id"))
      .def("num_tokens", &BlockManager::num_tokens, py::arg("seq_id"))
      .def("has_seq", &BlockManager::has_seq, py::arg("seq_id"))
      .def("seq_ids", &BlockManager::seq_ids, "Ids of the live sequences, sorted.")
      .def(
          "pin_prefix",
          [](BlockManager &self, const std::vector<int64_t> &tokens, const py::int_ &salt) {
            return self.pin_prefix(tokens, to_salt(salt));
          },
          py::arg("tokens"), py::arg("salt") = 0,
          "Pin the cached full blocks of the longest cached prefix of tokens; returns the tokens pinned.")
      .def(
          "unpin_prefix",
          [](BlockManager &self, const std::vector<int64_t> &tokens, const py::int_ &salt) {
            self.unpin_prefix(tokens, to_salt(salt));
          },
          py::arg("tokens"), py::arg("salt") = 0, "Undo the latest pin_prefix of the same tokens and salt.")
      .def("evict", &BlockManager::evict, py::arg("num_blocks"))
      .def("check_invariants", &BlockManager::check_invariants)
      .def("__repr__", [](const BlockManager &self) {
        return "BlockManager(num_blocks=" + std::to_string(self.num_blocks()) +
               ", block_size=" + std::to_string(self.block_size()) + ", used=" + std::to_string(self.num_used()) +
               ", cached=" + std::to_string(self.num_cached()) + ", free=" + std::to_string(self.num_free()) + ")";
      });
}

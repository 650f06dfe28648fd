// The native module: host-side bookkeeping and CPU kernels for the engine. No torch or CUDA headers on purpose,
// so it builds in an isolated pip build and does not depend on the torch version.
#include <pybind11/pybind11.h>

namespace py = pybind11;

void bind_block_manager(py::module_ &m);
void bind_cuda_index(py::module_ &m);
void bind_cpu_kernels(py::module_ &m);

PYBIND11_MODULE(step3vl_native, m) {
  m.doc() = "step3vl native module: KV block manager, CPU kernels and host builds of the CUDA kernels' index math";
  bind_block_manager(m);
  bind_cuda_index(m);
  bind_cpu_kernels(m);
}

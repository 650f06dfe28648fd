// Host builds of the CUDA kernels' index math (filled in by the kernels work).
#include <pybind11/pybind11.h>
namespace py = pybind11;
void bind_cuda_index(py::module_ &m) { (void)m; }

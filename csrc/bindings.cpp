// Python bindings of vimpo_kernels._C. The ops themselves live in one file per op.
#include <torch/extension.h>

namespace vimpo {
bool built_with_cuda() {
#ifdef VIMPO_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace vimpo

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "vimpo_kernels compiled backends (C++ CPU, optional CUDA)";
  m.def("built_with_cuda", &vimpo::built_with_cuda, "True when the CUDA kernels were compiled in");
}

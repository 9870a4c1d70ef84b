// The small binding file: the module object for `srel_fast._C` (setup.py build)
// and one op saying whether CUDA kernels were compiled in. Each kernel file
// registers its own ops with TORCH_LIBRARY_FRAGMENT(srel_fast, m).
#include <torch/extension.h>
#include <torch/library.h>

static bool built_with_cuda() {
#ifdef SREL_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

TORCH_LIBRARY_FRAGMENT(srel_fast, m) {
  m.def("_ext_built_with_cuda() -> bool", &built_with_cuda);
}

#ifdef TORCH_EXTENSION_NAME
// Only present in the setup.py build, where the library is imported as a module.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
#endif

// The Python module hydra_fast._C: importing it loads the shared library, which registers the ops
// (TORCH_LIBRARY in ops.cpp, kernels in cpu/ and cuda/). It exposes only what was compiled.
#include <pybind11/pybind11.h>
#include <string>

#ifdef HYDRA_FAST_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "hydra_fast compiled ops (registered under torch.ops.hydra_fast)";
  m.def("build_info", []() {
    py::dict info;
    info["torch_version"] = std::string(HYDRA_FAST_TORCH_VERSION);
#ifdef HYDRA_FAST_WITH_CUDA
    info["cuda"] = true;
    info["cuda_archs"] = std::string(HYDRA_FAST_CUDA_ARCHS);
    info["cuda_runtime_version"] = CUDART_VERSION;
#else
    info["cuda"] = false;
    info["cuda_archs"] = std::string("");
    info["cuda_runtime_version"] = py::none();
#endif
    info["cxx_standard"] = __cplusplus;
    return info;
  });
}

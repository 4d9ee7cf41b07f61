// Host-side helpers for the CUDA glue in csrc/cuda/*.cu: device properties, alignment tests and error checks.
// Only c10/cuda headers (no ATen/cuda/CUDAContext.h, which pulls in cuBLAS/cuSPARSE headers).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace hydra_fast::cuda_glue {

// Multiprocessor count of `device`, read once per device (cudaDeviceGetAttribute is not a stream operation,
// so this is safe during graph capture too).
inline int sm_count(int device) {
  static std::array<std::atomic<int>, 64> cache{};
  if (device < 0 || device >= 64) {
    int n = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    return n;
  }
  int n = cache[device].load(std::memory_order_relaxed);
  if (n == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    cache[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

// An on-by-default switch of the environment: off when `name` is set to "0". Callers read it once per process.
inline bool env_switch_on(const char* name) {
  const char* v = std::getenv(name);
  return v == nullptr || std::strcmp(v, "0") != 0;
}

// Whether the fused step's kernels may launch with programmatic dependent launch: unless the environment sets
// HYDRA_FAST_PDL=0 (read once per process; a switch for debugging tools and for measuring what it saves). Whether
// a device can is kernels::launch_kernel's question (the kernel's code must come from sm_90+ PTX, which only an
// sm_90+ device runs).
inline bool pdl_allowed() {
  static const bool allowed = env_switch_on("HYDRA_FAST_PDL");
  return allowed;
}

// Whether tree attention may merge its KV chunks inside thread-block clusters: unless HYDRA_FAST_ATTN_CLUSTER=0
// (read once per process: a switch for measuring it and for testing the combine kernel on the same inputs).
inline bool attn_cluster_allowed() {
  static const bool allowed = env_switch_on("HYDRA_FAST_ATTN_CLUSTER");
  return allowed;
}

// Raise a kernel's dynamic shared-memory limit when it needs more than the default 48 KB. Called before each
// launch that needs it: cheap, and per device/context, so no caching that could miss a second GPU.
template <typename Kernel>
inline void allow_dynamic_smem(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
}

inline bool ptr_aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Every stride of `t` but the last (stride 1, checked) is a multiple of `elems` elements, and the data pointer
// is aligned to `elems` elements: rows can then be read in vectors of `elems` elements.
inline bool rows_vector_aligned(const at::Tensor& t, int64_t elems) {
  if (!ptr_aligned(t.const_data_ptr(), static_cast<size_t>(elems * t.element_size()))) return false;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    if (t.size(d) > 1 && t.stride(d) % elems != 0) return false;
  }
  return t.size(-1) % elems == 0;
}

// Rows of `t` (`rows` of them, `row_stride` elements apart) start on `elems`-element boundaries and hold a multiple
// of `elems` values: each row can be read in vectors of `elems` elements.
inline bool rows_aligned(const at::Tensor& t, int64_t rows, int64_t row_stride, int64_t elems) {
  return ptr_aligned(t.const_data_ptr(), static_cast<size_t>(elems * t.element_size())) && t.size(-1) % elems == 0 &&
         (rows <= 1 || row_stride % elems == 0);
}

}  // namespace hydra_fast::cuda_glue

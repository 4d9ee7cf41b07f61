// CUDA glue of kv_compact: checks, device guard, current stream, vector width, launch. See
// kernels/kv_compact.cuh. The op is a pure copy, so it dispatches on the byte width of a row, not the dtype.
#include <torch/library.h>

#include "checks.h"
#include "glue.h"
#include "kernels/kv_compact.cuh"

namespace hydra_fast {
namespace {

// The widest vector (16, 8, 4 or 2 bytes) that divides the row size, both base pointers and every stride.
int64_t vector_bytes(const at::Tensor& k, const at::Tensor& v) {
  const int64_t esize = k.element_size();
  for (int64_t w : {16, 8, 4, 2}) {
    bool ok = (k.size(4) * esize) % w == 0;
    for (const at::Tensor* t : {&k, &v}) {
      ok = ok && cuda_glue::ptr_aligned(t->const_data_ptr(), static_cast<size_t>(w));
      for (int d = 0; d < 4; ++d) ok = ok && (t->stride(d) * esize) % w == 0;
    }
    if (ok) return w;
  }
  return esize;  // 2 or 4: always divides
}

void kv_compact_cuda(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& cache_lens,
                     const at::Tensor& accepted_nodes) {
  check_kv_compact(k_cache, v_cache, cache_lens, accepted_nodes);
  TORCH_CHECK(k_cache.is_cuda(), "hydra_fast.kv_compact: k_cache must be a CUDA tensor");
  if (k_cache.numel() == 0 || accepted_nodes.numel() == 0) return;
  TORCH_CHECK(accepted_nodes.size(1) <= 0x7fffffff, "hydra_fast.kv_compact: accepted_nodes too long");

  const c10::cuda::CUDAGuard guard(k_cache.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const int64_t esize = k_cache.element_size();
  const int64_t vbytes = vector_bytes(k_cache, v_cache);
  kernels::KvCompactParams p{};
  p.base[0] = static_cast<char*>(k_cache.mutable_data_ptr());
  p.base[1] = static_cast<char*>(v_cache.mutable_data_ptr());
  for (int d = 0; d < 4; ++d) {
    p.stride[0][d] = k_cache.stride(d) * esize;
    p.stride[1][d] = v_cache.stride(d) * esize;
  }
  p.L = k_cache.size(0);
  p.B = k_cache.size(1);
  p.H = k_cache.size(2);
  p.S = k_cache.size(3);
  p.row_vecs = k_cache.size(4) * esize / vbytes;
  p.lens = cache_lens.const_data_ptr<int32_t>();
  p.lens_stride = cache_lens.stride(0);
  p.nodes = accepted_nodes.const_data_ptr<int64_t>();
  p.nodes_s0 = accepted_nodes.stride(0);
  p.nodes_s1 = accepted_nodes.stride(1);
  p.Lp = static_cast<int>(accepted_nodes.size(1));

  auto launch = [&](auto vec_tag) {
    using VecT = decltype(vec_tag);
    return p.Lp <= 8 ? kernels::launch_kv_compact<VecT, 8>(p, stream)
                     : kernels::launch_kv_compact<VecT, 16>(p, stream);
  };
  cudaError_t err;
  switch (vbytes) {
    case 16: err = launch(uint4{}); break;
    case 8: err = launch(uint2{}); break;
    case 4: err = launch(uint32_t{}); break;
    default: err = launch(uint16_t{}); break;
  }
  TORCH_CHECK(err == cudaSuccess, "hydra_fast.kv_compact: CUDA launch failed: ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_IMPL(hydra_fast, CUDA, m) { m.impl("kv_compact", &kv_compact_cuda); }

}  // namespace hydra_fast

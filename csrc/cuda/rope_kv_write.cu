// CUDA glue of rope_kv_write: checks, device guard, current stream, dtype and vector-width dispatch, launch. See
// kernels/rope_kv_write.cuh. Heads are read as 16-byte vectors when D/2 and every row involved (qkv, cos, sin,
// norms, the layer's caches) are 16-byte aligned, else one element at a time.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>

#include "checks.h"
#include "glue.h"
#include "kernels/rope_kv_write.cuh"
#include "static_switch.h"

namespace hydra_fast {
namespace {

// Every tensor the kernel reads or writes in vectors of `elems` elements is aligned for them.
bool all_aligned(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& k_cache,
                 const at::Tensor& v_cache, const std::optional<at::Tensor>& q_norm,
                 const std::optional<at::Tensor>& k_norm, int64_t elems) {
  const size_t bytes = static_cast<size_t>(elems * qkv.element_size());
  bool ok = (cos.size(2) / 2) % elems == 0;
  for (const at::Tensor* t : {&qkv, &cos, &sin, &k_cache, &v_cache}) ok = ok && cuda_glue::rows_vector_aligned(*t, elems);
  for (const std::optional<at::Tensor>* t : {&q_norm, &k_norm}) {
    ok = ok && (!t->has_value() || cuda_glue::ptr_aligned((*t)->const_data_ptr(), bytes));
  }
  return ok;
}

template <typename T, int kVec>
cudaError_t launch_per(const kernels::RopeKvParams& p, int per, cudaStream_t stream, bool pdl) {
  if constexpr (kVec > 1) {
    return kernels::launch_rope_kv_write<T, kVec, 1>(p, stream, pdl);  // D <= 256: one vector per lane and half
  } else {
    if (per <= 1) return kernels::launch_rope_kv_write<T, 1, 1>(p, stream, pdl);
    if (per <= 2) return kernels::launch_rope_kv_write<T, 1, 2>(p, stream, pdl);
    return kernels::launch_rope_kv_write<T, 1, 4>(p, stream, pdl);
  }
}

at::Tensor rope_kv_write_cuda(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                              const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t layer,
                              const at::Tensor& cache_lens, int64_t num_q_heads, int64_t num_kv_heads,
                              const std::optional<at::Tensor>& q_norm, const std::optional<at::Tensor>& k_norm,
                              double eps) {
  check_rope_kv_write(qkv, cos, sin, k_cache, v_cache, layer, cache_lens, num_q_heads, num_kv_heads, q_norm, k_norm,
                      eps);
  const char* op = "hydra_fast.rope_kv_write";
  TORCH_CHECK(qkv.is_cuda(), op, ": qkv must be a CUDA tensor");
  const int64_t B = qkv.size(0), N = qkv.size(1), D = cos.size(2), S = k_cache.size(3);
  TORCH_CHECK(D <= 256, op, ": head dim D must be <= 256 on CUDA, got ", D);
  TORCH_CHECK(num_q_heads + 2 * num_kv_heads <= 0x7fffffff / 256 && S <= 0x7fffffff && N <= 0x7fffffff &&
                  B <= 0x7fffffff,
              op, ": sizes too large (B = ", B, ", N = ", N, ", S = ", S, ")");
  at::Tensor q = at::empty({B, N, num_q_heads, D}, qkv.options());  // [B, N, Hq, D]
  if (q.numel() == 0) return q;
  const c10::cuda::CUDAGuard guard(qkv.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const int64_t vec16 = 16 / qkv.element_size();
  const bool wide = all_aligned(qkv, cos, sin, k_cache, v_cache, q_norm, k_norm, vec16);
  const int vec = static_cast<int>(wide ? vec16 : 1);
  const int nvec = static_cast<int>(D / 2 / vec);
  kernels::RopeKvParams p{};
  p.qkv = qkv.const_data_ptr();
  p.cos = cos.const_data_ptr();
  p.sin = sin.const_data_ptr();
  p.q_norm = q_norm ? q_norm->const_data_ptr() : nullptr;
  p.k_norm = k_norm ? k_norm->const_data_ptr() : nullptr;
  p.q_out = q.mutable_data_ptr();
  const at::Tensor* caches[2] = {&k_cache, &v_cache};
  for (int c = 0; c < 2; ++c) {
    const at::Tensor& t = *caches[c];
    p.cache[c] = static_cast<char*>(t.mutable_data_ptr()) + layer * t.stride(0) * t.element_size();
    for (int d = 0; d < 3; ++d) p.cache_stride[c][d] = t.stride(d + 1);
  }
  p.lens = cache_lens.const_data_ptr<int32_t>();
  p.lens_stride = cache_lens.stride(0);
  p.qkv_sb = qkv.stride(0);
  p.qkv_sn = qkv.stride(1);
  p.cos_sb = cos.stride(0);
  p.cos_sn = cos.stride(1);
  p.sin_sb = sin.stride(0);
  p.sin_sn = sin.stride(1);
  p.B = static_cast<int>(B);
  p.N = static_cast<int>(N);
  p.Hq = static_cast<int>(num_q_heads);
  p.Hkv = static_cast<int>(num_kv_heads);
  p.D = static_cast<int>(D);
  p.S = static_cast<int>(S);
  p.group = kernels::rope_group(nvec);
  p.eps = static_cast<float>(eps);
  const int per = kernels::rope_per_lane(nvec, p.group);
  const bool pdl = cuda_glue::pdl_allowed();
  const cudaError_t err = HF_DTYPE_SWITCH(qkv.scalar_type(), T, [&] {
    return wide ? launch_per<T, 16 / sizeof(T)>(p, per, stream, pdl) : launch_per<T, 1>(p, per, stream, pdl);
  });
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
  return q;
}

}  // namespace

TORCH_LIBRARY_IMPL(hydra_fast, CUDA, m) { m.impl("rope_kv_write", &rope_kv_write_cuda); }

}  // namespace hydra_fast

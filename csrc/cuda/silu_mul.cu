// CUDA glue of silu_mul: checks, device guard, current stream, dtype and vector-width dispatch, launch. See
// kernels/silu_mul.cuh. 16-byte vectors when the rows and the gate/up split are 16-byte aligned.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "glue.h"
#include "kernels/silu_mul.cuh"
#include "static_switch.h"

namespace hydra_fast {
namespace {

at::Tensor silu_mul_cuda(const at::Tensor& x) {
  const RowLayout xl = check_silu_mul(x);
  TORCH_CHECK(x.is_cuda(), "hydra_fast.silu_mul: x must be a CUDA tensor");
  const int64_t I = x.size(-1) / 2;
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = I;
  at::Tensor out = at::empty(shape, x.options());  // [..., I], contiguous
  if (out.numel() == 0) return out;
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t vec16 = 16 / x.element_size();
  const bool wide = cuda_glue::ptr_aligned(x.const_data_ptr(), 16) && I % vec16 == 0 &&
                    (xl.rows <= 1 || xl.row_stride % vec16 == 0);
  kernels::SiluMulParams p{};
  p.x = x.const_data_ptr();
  p.out = out.mutable_data_ptr();
  p.x_stride = xl.row_stride;
  p.rows = xl.rows;
  p.I = I;
  const cudaError_t err = HF_DTYPE_SWITCH(x.scalar_type(), T, [&] {
    return wide ? kernels::launch_silu_mul<T, 16 / sizeof(T)>(p, stream) : kernels::launch_silu_mul<T, 1>(p, stream);
  });
  TORCH_CHECK(err == cudaSuccess, "hydra_fast.silu_mul: CUDA launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(hydra_fast, CUDA, m) { m.impl("silu_mul", &silu_mul_cuda); }

}  // namespace hydra_fast

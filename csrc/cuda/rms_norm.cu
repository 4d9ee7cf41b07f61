// CUDA glue of rms_norm and add_rms_norm: checks, device guard, current stream, dtype and vector-width dispatch,
// launch. See kernels/rms_norm.cuh. Rows are read as 16-byte vectors when every row is 16-byte aligned, else one
// element at a time.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "checks.h"
#include "glue.h"
#include "kernels/rms_norm.cuh"
#include "static_switch.h"

namespace hydra_fast {
namespace {

// out = rms_norm(x [+ residual]); sum = x + residual when `residual` is given.
void launch(const char* op, const at::Tensor& x, const RowLayout& xl, const at::Tensor* residual,
            const RowLayout& rl, const at::Tensor& weight, double eps, at::Tensor& out, at::Tensor* sum) {
  TORCH_CHECK(x.is_cuda(), "hydra_fast.", op, ": x must be a CUDA tensor");
  if (xl.rows == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t d = x.size(-1);
  const int64_t vec16 = 16 / x.element_size();
  const bool wide = cuda_glue::rows_aligned(x, xl.rows, xl.row_stride, vec16) &&
                    (!residual || cuda_glue::rows_aligned(*residual, rl.rows, rl.row_stride, vec16)) &&
                    cuda_glue::ptr_aligned(weight.const_data_ptr(), 16);
  const int64_t vec = wide ? vec16 : 1;
  // Vectors a thread holds: 1, 2, 4 (8 one element at a time), so that one CTA of at most 1024 threads spans d.
  const int64_t per = (d / vec + kernels::kRmsMaxThreads - 1) / kernels::kRmsMaxThreads;
  const int64_t max_per = wide ? 4 : 8;
  TORCH_CHECK(per <= max_per, "hydra_fast.", op, ": d = ", d, " is too wide: at most ",
              max_per * vec * kernels::kRmsMaxThreads, " for ", wide ? "16-byte aligned" : "unaligned",
              " rows of ", x.scalar_type(), wide ? "" : " (align rows to 16 bytes to allow wider ones)");
  kernels::RmsNormParams p{};
  p.x = x.const_data_ptr();
  p.residual = residual ? residual->const_data_ptr() : nullptr;
  p.weight = weight.const_data_ptr();
  p.out = out.mutable_data_ptr();
  p.sum = sum ? sum->mutable_data_ptr() : nullptr;
  p.x_stride = xl.row_stride;
  p.residual_stride = rl.row_stride;
  p.rows = xl.rows;
  p.d = static_cast<int>(d);
  p.eps = static_cast<float>(eps);
  const cudaError_t err = HF_DTYPE_SWITCH(x.scalar_type(), T, [&] {
    return HF_BOOL_SWITCH(residual != nullptr, kAdd, [&] {
      return HF_POW2_UPTO8_SWITCH(per, kPer, [&] {
        constexpr int kWide = 16 / sizeof(T);
        if constexpr (kPer <= 4) {
          if (wide) return kernels::launch_rms_norm<T, kWide, kPer, kAdd>(p, stream);
        }
        return kernels::launch_rms_norm<T, 1, kPer, kAdd>(p, stream);
      });
    });
  });
  TORCH_CHECK(err == cudaSuccess, "hydra_fast.", op, ": CUDA launch failed: ", cudaGetErrorString(err));
}

at::Tensor rms_norm_cuda(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const RowLayout xl = check_rms_norm("rms_norm", x, weight, eps);
  at::Tensor out = at::empty(x.sizes(), x.options());  // [..., d], contiguous
  launch("rms_norm", x, xl, nullptr, xl, weight, eps, out, nullptr);
  return out;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm_cuda(const at::Tensor& x, const at::Tensor& residual,
                                                     const at::Tensor& weight, double eps) {
  const AddRmsNormLayout l = check_add_rms_norm(x, residual, weight, eps);
  at::Tensor out = at::empty(x.sizes(), x.options());  // [..., d]
  at::Tensor sum = at::empty(x.sizes(), x.options());  // [..., d]
  launch("add_rms_norm", x, l.x, &residual, l.residual, weight, eps, out, &sum);
  return {out, sum};
}

}  // namespace

TORCH_LIBRARY_IMPL(hydra_fast, CUDA, m) {
  m.impl("rms_norm", &rms_norm_cuda);
  m.impl("add_rms_norm", &add_rms_norm_cuda);
}

}  // namespace hydra_fast

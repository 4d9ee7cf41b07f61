// CUDA glue of linear, rms_norm_linear and add_rms_norm_linear: checks, then the GEMV kernel
// (kernels/fused_linear.cuh) for up to kFlMaxRows rows whose inputs fit in shared memory and are 16-byte aligned,
// else the composed steps (fused_linear.h: the elementwise kernel, then cuBLAS), which is also what a tree of
// many nodes runs: at 16+ rows the GEMV would read the weight once but leave the tensor cores idle.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "checks.h"
#include "fused_linear.h"
#include "glue.h"
#include "kernels/fused_linear.cuh"
#include "static_switch.h"

namespace hydra_fast {
namespace {

using kernels::Prologue;

// The inputs of one fused linear op.
struct Inputs {
  const at::Tensor& x;
  RowLayout xl;
  const at::Tensor* residual;  // add_rms_norm_linear
  RowLayout rl;
  const at::Tensor* norm_weight;  // rms_norm_linear, add_rms_norm_linear
  double eps;
  const at::Tensor& weight;
  const std::optional<at::Tensor>& bias;
  bool silu_mul = false;  // the SiLU-and-multiply epilogue (weight: gate | up)
};

// Whether the GEMV kernel takes these inputs: the shapes it supports, and where it is the faster one. On the
// H200 (bench/RESULTS.md) it streams a weight at ~90 % of copy bandwidth once each warp takes 3+ rows (Llama-8B's
// gate|up), but at ~65 % when a wave of warps covers the rows once or twice (8B's q|k|v, o, down), where cuBLAS
// reaches ~88 %; below a few MB every product is launch-bound and the GEMV's saved kernels win. Past 8 rows (a
// draft tree's) it loses even there: on SmolLM2 a 32-row step through a 32-row form of it took 3.85 ms against
// 1.47 ms for 33 rows through cuBLAS (bench/RESULTS.md), so that form was not kept.
bool gemv_fits(const Inputs& in) {
  constexpr int64_t kSmallWeightBytes = 8 << 20;
  constexpr int64_t kWarpsPerSm = 32;  // resident warps of the 4-warp CTAs at <= 64 registers
  constexpr int64_t kRowsPerWarp = 3;
  const int64_t elems = 16 / in.x.element_size();
  const int64_t M = in.xl.rows, N = in.weight.size(0), K = in.weight.size(1);
  const int64_t items = in.silu_mul ? N / 2 : N;
  const bool small = N * K * in.x.element_size() <= kSmallWeightBytes;
  if (!small && items < kRowsPerWarp * kWarpsPerSm * cuda_glue::sm_count(in.x.get_device())) return false;
  return M >= 1 && M <= kernels::kFlMaxRows && K >= 1 && K % elems == 0 &&
         kernels::fused_linear_smem(static_cast<int>(M), static_cast<int>(K), in.x.element_size()) <=
             static_cast<size_t>(kernels::kFlMaxSmem) &&
         N < (int64_t(1) << 31) && in.xl.row_stride < (int64_t(1) << 31) &&
         cuda_glue::rows_aligned(in.x, in.xl.rows, in.xl.row_stride, elems) &&
         (!in.residual || cuda_glue::rows_aligned(*in.residual, in.rl.rows, in.rl.row_stride, elems)) &&
         (!in.norm_weight || cuda_glue::ptr_aligned(in.norm_weight->const_data_ptr(), 16)) &&
         cuda_glue::ptr_aligned(in.weight.const_data_ptr(), 16) && (N <= 1 || in.weight.stride(0) % elems == 0);
}

// out [..., N] ([..., N / 2] with the SiLU epilogue; and, for kAddRms, sum [..., K]) by the GEMV kernel.
template <Prologue P>
void launch(const char* op, const Inputs& in, at::Tensor& out, at::Tensor* sum) {
  const c10::cuda::CUDAGuard guard(in.x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  kernels::FusedLinearParams p{};
  p.x = in.x.const_data_ptr();
  p.x_stride = in.xl.row_stride;
  p.residual = in.residual ? in.residual->const_data_ptr() : nullptr;
  p.residual_stride = in.rl.row_stride;
  p.norm_weight = in.norm_weight ? in.norm_weight->const_data_ptr() : nullptr;
  p.weight = in.weight.const_data_ptr();
  p.w_stride = in.weight.stride(0);
  p.bias = in.bias ? in.bias->const_data_ptr() : nullptr;
  p.out = out.mutable_data_ptr();
  p.sum = sum ? sum->mutable_data_ptr() : nullptr;
  p.M = static_cast<int>(in.xl.rows);
  p.N = static_cast<int>(in.weight.size(0));
  p.K = static_cast<int>(in.weight.size(1));
  p.eps = static_cast<float>(in.eps);
  const int sms = cuda_glue::sm_count(in.x.get_device());
  const bool pdl = cuda_glue::pdl_allowed();
  const cudaError_t err = HF_DTYPE_SWITCH(in.x.scalar_type(), T, [&] {
    return HF_POW2_UPTO8_SWITCH(p.M, kRows, [&] {
      return HF_BOOL_SWITCH(in.bias.has_value(), kBias, [&] {
        if constexpr (P == Prologue::kAddRms) {  // the only op with the epilogue
          if (in.silu_mul) return kernels::launch_fused_linear<T, P, kRows, kBias, true>(p, sms, stream, pdl);
        }
        return kernels::launch_fused_linear<T, P, kRows, kBias, false>(p, sms, stream, pdl);
      });
    });
  });
  TORCH_CHECK(err == cudaSuccess, "hydra_fast.", op, ": CUDA launch failed: ", cudaGetErrorString(err));
}

at::Tensor linear_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const Inputs in{x, check_linear(x, weight, bias), nullptr, {}, nullptr, 0.0, weight, bias};
  TORCH_CHECK(x.is_cuda(), "hydra_fast.linear: x must be a CUDA tensor");
  if (!gemv_fits(in)) return composed::project(x, weight, bias);
  at::Tensor out = at::empty(composed::with_last(x, weight.size(0)), x.options());  // [..., N]
  launch<Prologue::kNone>("linear", in, out, nullptr);
  return out;
}

at::Tensor rms_norm_linear_cuda(const at::Tensor& x, const at::Tensor& norm_weight, double eps,
                                const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const char* op = "rms_norm_linear";
  const RowLayout xl = check_rms_norm_linear(x, norm_weight, eps, weight, bias);
  TORCH_CHECK(x.is_cuda(), "hydra_fast.", op, ": x must be a CUDA tensor");
  const Inputs in{x, xl, nullptr, {}, &norm_weight, eps, weight, bias};
  if (!gemv_fits(in)) return composed::rms_norm_linear(x, norm_weight, eps, weight, bias);
  at::Tensor out = at::empty(composed::with_last(x, weight.size(0)), x.options());  // [..., N]
  launch<Prologue::kRms>(op, in, out, nullptr);
  return out;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm_linear_cuda(const at::Tensor& x, const at::Tensor& residual,
                                                            const at::Tensor& norm_weight, double eps,
                                                            const at::Tensor& weight,
                                                            const std::optional<at::Tensor>& bias, bool silu_mul) {
  const char* op = "add_rms_norm_linear";
  const AddRmsNormLayout l = check_add_rms_norm_linear(x, residual, norm_weight, eps, weight, bias, silu_mul);
  TORCH_CHECK(x.is_cuda(), "hydra_fast.", op, ": x must be a CUDA tensor");
  const Inputs in{x, l.x, &residual, l.residual, &norm_weight, eps, weight, bias, silu_mul};
  if (!gemv_fits(in)) return composed::add_rms_norm_linear(x, residual, norm_weight, eps, weight, bias, silu_mul);
  const int64_t n_out = silu_mul ? weight.size(0) / 2 : weight.size(0);
  at::Tensor out = at::empty(composed::with_last(x, n_out), x.options());  // [..., N] or [..., N / 2]
  at::Tensor sum = at::empty(x.sizes(), x.options());                     // [..., K]
  launch<Prologue::kAddRms>(op, in, out, &sum);
  return {out, sum};
}

}  // namespace

TORCH_LIBRARY_IMPL(hydra_fast, CUDA, m) {
  m.impl("linear", &linear_cuda);
  m.impl("rms_norm_linear", &rms_norm_linear_cuda);
  m.impl("add_rms_norm_linear", &add_rms_norm_linear_cuda);
}

}  // namespace hydra_fast

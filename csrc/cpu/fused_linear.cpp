// CPU linear, rms_norm_linear and add_rms_norm_linear: the CPU kernel of the elementwise step, then the product
// (fused_linear.h: for 2..4 fp32 rows the few-rows kernel, which reads each weight row once for all rows, else
// MKL's GEMM). Fusing the prologue into the product would save only a pass over the few input rows.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "checks.h"
#include "fused_linear.h"

namespace hydra_fast {
namespace {

at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_linear(x, weight, bias);
  return composed::project(x, weight, bias);
}

at::Tensor rms_norm_linear_cpu(const at::Tensor& x, const at::Tensor& norm_weight, double eps,
                               const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_rms_norm_linear(x, norm_weight, eps, weight, bias);
  return composed::rms_norm_linear(x, norm_weight, eps, weight, bias);
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm_linear_cpu(const at::Tensor& x, const at::Tensor& residual,
                                                           const at::Tensor& norm_weight, double eps,
                                                           const at::Tensor& weight,
                                                           const std::optional<at::Tensor>& bias, bool silu_mul) {
  check_add_rms_norm_linear(x, residual, norm_weight, eps, weight, bias, silu_mul);
  return composed::add_rms_norm_linear(x, residual, norm_weight, eps, weight, bias, silu_mul);
}

}  // namespace

TORCH_LIBRARY_IMPL(hydra_fast, CPU, m) {
  m.impl("linear", &linear_cpu);
  m.impl("rms_norm_linear", &rms_norm_linear_cpu);
  m.impl("add_rms_norm_linear", &add_rms_norm_linear_cpu);
}

}  // namespace hydra_fast

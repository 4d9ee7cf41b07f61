// CPU linear, rms_norm_linear and add_rms_norm_linear: the CPU kernel of the elementwise step, then MKL's GEMM
// (fused_linear.h). On the CPU the GEMM streams the weight at any row count; fusing the prologue into it would save
// only the pass over the few input rows.
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
  const char* op = "rms_norm_linear";
  check_rms_norm(op, x, norm_weight, eps);
  check_linear_weight(op, x, x.size(-1), "K from x's last dim", weight, bias);
  return composed::project(composed::rms_norm(x, norm_weight, eps), weight, bias);
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm_linear_cpu(const at::Tensor& x, const at::Tensor& residual,
                                                           const at::Tensor& norm_weight, double eps,
                                                           const at::Tensor& weight,
                                                           const std::optional<at::Tensor>& bias, bool silu_mul) {
  const char* op = "add_rms_norm_linear";
  check_add_rms_norm(x, residual, norm_weight, eps, op);
  check_linear_weight(op, x, x.size(-1), "K from x's last dim", weight, bias);
  if (silu_mul) check_silu_mul_rows(op, weight);
  return composed::add_rms_norm_linear(x, residual, norm_weight, eps, weight, bias, silu_mul);
}

}  // namespace

TORCH_LIBRARY_IMPL(hydra_fast, CPU, m) {
  m.impl("linear", &linear_cpu);
  m.impl("rms_norm_linear", &rms_norm_linear_cpu);
  m.impl("add_rms_norm_linear", &add_rms_norm_linear_cpu);
}

}  // namespace hydra_fast

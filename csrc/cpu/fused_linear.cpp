// CPU linear, rms_norm_linear and add_rms_norm_linear: the CPU kernel of the elementwise step, then the product:
// for 2..4 fp32 rows the few-rows kernel (cpu/few_rows_linear.h: each weight row read once for all rows), else
// MKL's GEMM (fused_linear.h). Fusing the prologue into the product would save only a pass over the few input rows.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "checks.h"
#include "cpu/few_rows_linear.h"
#include "fused_linear.h"

namespace hydra_fast {
namespace {

// h [..., K] (rows as `l`) @ weight.T + bias -> [..., N] (or its silu_mul [..., N / 2]).
at::Tensor project(const at::Tensor& h, const RowLayout& l, const at::Tensor& weight,
                   const std::optional<at::Tensor>& bias, bool silu_mul_out = false) {
  if (!cpu::few_rows_fits(h, l.rows, weight, bias)) return composed::project(h, weight, bias, silu_mul_out);
  std::vector<int64_t> shape = h.sizes().vec();
  shape.back() = weight.size(0);
  at::Tensor out = cpu::few_rows_linear(h, l.rows, l.row_stride, weight, bias).view(shape);
  return silu_mul_out ? composed::silu_mul(out) : out;
}

RowLayout contiguous_rows(const at::Tensor& t) { return {t.numel() / std::max<int64_t>(t.size(-1), 1), t.size(-1)}; }

at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  return project(x, check_linear(x, weight, bias), weight, bias);
}

at::Tensor rms_norm_linear_cpu(const at::Tensor& x, const at::Tensor& norm_weight, double eps,
                               const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const char* op = "rms_norm_linear";
  check_rms_norm(op, x, norm_weight, eps);
  check_linear_weight(op, x, x.size(-1), "K from x's last dim", weight, bias);
  const at::Tensor h = composed::rms_norm(x, norm_weight, eps);  // contiguous
  return project(h, contiguous_rows(h), weight, bias);
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm_linear_cpu(const at::Tensor& x, const at::Tensor& residual,
                                                           const at::Tensor& norm_weight, double eps,
                                                           const at::Tensor& weight,
                                                           const std::optional<at::Tensor>& bias, bool silu_mul) {
  const char* op = "add_rms_norm_linear";
  check_add_rms_norm(x, residual, norm_weight, eps, op);
  check_linear_weight(op, x, x.size(-1), "K from x's last dim", weight, bias);
  if (silu_mul) check_silu_mul_rows(op, weight);
  auto [h, sum] = composed::add_rms_norm(x, residual, norm_weight, eps);  // contiguous
  return {project(h, contiguous_rows(h), weight, bias, silu_mul), sum};
}

}  // namespace

TORCH_LIBRARY_IMPL(hydra_fast, CPU, m) {
  m.impl("linear", &linear_cpu);
  m.impl("rms_norm_linear", &rms_norm_linear_cpu);
  m.impl("add_rms_norm_linear", &add_rms_norm_linear_cpu);
}

}  // namespace hydra_fast

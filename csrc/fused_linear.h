// The fused linear ops (linear, rms_norm_linear, add_rms_norm_linear) as their steps: the elementwise op
// (hydra_fast::rms_norm or add_rms_norm, called through the dispatcher, so the kernel of the tensors' device
// runs), the product (2-4 fp32 rows on the CPU: the few-rows kernel, cpu/few_rows_linear.h; else at::linear, MKL
// on the CPU and cuBLAS on CUDA), then, for silu_mul=True, hydra_fast::silu_mul. This is the whole CPU
// implementation, and the CUDA one for the shapes its GEMV kernel does not take (more than a few rows, unaligned
// rows, large weights). Checks are the caller's (checks.h), done before this runs.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <tuple>
#include <vector>

#include "checks.h"
#include "cpu/few_rows_linear.h"

namespace hydra_fast::composed {

inline at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("hydra_fast::rms_norm", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double)>();
  return op.call(x, weight, eps);
}

inline std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                       const at::Tensor& weight, double eps) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("hydra_fast::add_rms_norm", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>();
  return op.call(x, residual, weight, eps);
}

inline at::Tensor silu_mul(const at::Tensor& x) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("hydra_fast::silu_mul", "")
                             .typed<at::Tensor(const at::Tensor&)>();
  return op.call(x);
}

// x's shape with its last dim n: [..., n].
inline std::vector<int64_t> with_last(const at::Tensor& x, int64_t n) {
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = n;
  return shape;
}

// h [..., K] (checked by the caller) @ weight [N, K].T + bias -> [..., N] contiguous, or its silu_mul [..., N / 2].
inline at::Tensor project(const at::Tensor& h, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          bool silu_mul_out = false) {
  const RowLayout l = row_layout("linear", "x", h);  // metadata only
  at::Tensor out;
  if (cpu::few_rows_fits(h, l.rows, weight, bias)) {
    out = cpu::few_rows_linear(h, l.rows, l.row_stride, weight, bias).view(with_last(h, weight.size(0)));
  } else {
    out = at::linear(h, weight, bias).contiguous();
  }
  return silu_mul_out ? silu_mul(out) : out;
}

// rms_norm_linear as its steps.
inline at::Tensor rms_norm_linear(const at::Tensor& x, const at::Tensor& norm_weight, double eps,
                                  const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  return project(rms_norm(x, norm_weight, eps), weight, bias);
}

// add_rms_norm_linear as its steps.
inline std::tuple<at::Tensor, at::Tensor> add_rms_norm_linear(const at::Tensor& x, const at::Tensor& residual,
                                                              const at::Tensor& norm_weight, double eps,
                                                              const at::Tensor& weight,
                                                              const std::optional<at::Tensor>& bias, bool silu_mul_out) {
  auto [h, sum] = add_rms_norm(x, residual, norm_weight, eps);
  return {project(h, weight, bias, silu_mul_out), sum};
}

}  // namespace hydra_fast::composed

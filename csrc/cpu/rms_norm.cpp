// CPU rms_norm and add_rms_norm: one row of the last dim at a time, rows split across threads. The row is read
// once into fp32 (for add_rms_norm: x + residual rounded to the dtype, which is also the second output), then
// normalised with the shared row math of layer_math.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "checks.h"
#include "cpu/layer_math.h"

namespace hydra_fast {
namespace {

// out = rms_norm(x [+ residual]) and, with a residual, sum = x + residual; out and sum are contiguous.
template <typename T>
void norm_rows(const at::Tensor& x, const RowLayout& xl, const at::Tensor* residual, const RowLayout& rl,
               const at::Tensor& weight, float eps, at::Tensor& out, at::Tensor* sum) {
  const int64_t d = x.size(-1);
  const T* xp = x.const_data_ptr<T>();
  const T* rp = residual ? residual->const_data_ptr<T>() : nullptr;
  const T* wp = weight.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  T* sp = sum ? sum->mutable_data_ptr<T>() : nullptr;
  const int64_t grain = std::max<int64_t>(1, 16384 / d);
  at::parallel_for(0, xl.rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> row(d);
    for (int64_t r = begin; r < end; ++r) {
      const T* x_row = xp + r * xl.row_stride;
      if (rp) {
        const T* res_row = rp + r * rl.row_stride;
        for (int64_t i = 0; i < d; ++i) {
          const T h = static_cast<T>(static_cast<float>(x_row[i]) + static_cast<float>(res_row[i]));
          sp[r * d + i] = h;
          row[i] = static_cast<float>(h);
        }
      } else {
        for (int64_t i = 0; i < d; ++i) row[i] = static_cast<float>(x_row[i]);
      }
      cpu_math::rms_norm_row<T>(row.data(), wp, d, eps);
      for (int64_t i = 0; i < d; ++i) op[r * d + i] = static_cast<T>(row[i]);
    }
  });
}

at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const RowLayout xl = check_rms_norm("rms_norm", x, weight, eps);
  at::Tensor out = at::empty(x.sizes(), x.options());  // [..., d], contiguous
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "hydra_fast.rms_norm", [&] {
    norm_rows<scalar_t>(x, xl, nullptr, xl, weight, static_cast<float>(eps), out, nullptr);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm_cpu(const at::Tensor& x, const at::Tensor& residual,
                                                    const at::Tensor& weight, double eps) {
  const AddRmsNormLayout l = check_add_rms_norm(x, residual, weight, eps);
  at::Tensor out = at::empty(x.sizes(), x.options());  // [..., d]
  at::Tensor sum = at::empty(x.sizes(), x.options());  // [..., d]
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "hydra_fast.add_rms_norm", [&] {
    norm_rows<scalar_t>(x, l.x, &residual, l.residual, weight, static_cast<float>(eps), out, &sum);
  });
  return {out, sum};
}

}  // namespace

TORCH_LIBRARY_IMPL(hydra_fast, CPU, m) {
  m.impl("rms_norm", &rms_norm_cpu);
  m.impl("add_rms_norm", &add_rms_norm_cpu);
}

}  // namespace hydra_fast

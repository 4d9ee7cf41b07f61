// CPU silu_mul: out[r, i] = silu(x[r, i]) * x[r, I + i], silu rounded to the dtype first (reference.silu_mul),
// rows split across threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "checks.h"
#include "cpu/layer_math.h"

namespace hydra_fast {
namespace {

at::Tensor silu_mul_cpu(const at::Tensor& x) {
  const RowLayout xl = check_silu_mul(x);
  const int64_t I = x.size(-1) / 2;
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = I;
  at::Tensor out = at::empty(shape, x.options());  // [..., I], contiguous
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "hydra_fast.silu_mul", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, xl.rows, std::max<int64_t>(1, 16384 / I), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* gate = xp + r * xl.row_stride;
        const scalar_t* up = gate + I;
        for (int64_t i = 0; i < I; ++i) {
          op[r * I + i] = cpu_math::silu_mul<scalar_t>(static_cast<float>(gate[i]), static_cast<float>(up[i]));
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(hydra_fast, CPU, m) { m.impl("silu_mul", &silu_mul_cpu); }

}  // namespace hydra_fast

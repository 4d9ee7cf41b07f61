// CPU topk_rows: each row's k largest values and their indices, by value descending, ties to the lower index, NaN
// above every number and NaNs among themselves by index (the order of reference.topk_rows, a stable descending
// sort). A partial sort of the row's indices under that order; rows split across threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <tuple>
#include <vector>

#include "topk_rows.h"

namespace hydra_fast {
namespace {

// Whether element (va, a) comes before (vb, b) in the output order. A strict weak order on (value, index).
inline bool ranks_before(float va, int64_t a, float vb, int64_t b) {
  const bool na = std::isnan(va), nb = std::isnan(vb);
  if (na || nb) return na && (!nb || a < b);
  if (va != vb) return va > vb;  // -0.0 == 0.0, as torch.sort compares them
  return a < b;
}

std::tuple<at::Tensor, at::Tensor> topk_rows_cpu(const at::Tensor& x, int64_t k) {
  const TopkRowsIO io = topk_rows_io(x, k, check_topk_rows(x, k));
  const int64_t V = x.size(-1);
  const RowLayout xl = io.layout;
  at::Tensor values = io.values, indices = io.indices;
  if (xl.rows == 0) return {values, indices};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "hydra_fast.topk_rows", [&] {
    const scalar_t* xp = io.x.const_data_ptr<scalar_t>();
    scalar_t* vp = values.mutable_data_ptr<scalar_t>();
    int64_t* ip = indices.mutable_data_ptr<int64_t>();
    at::parallel_for(0, xl.rows, std::max<int64_t>(1, 32768 / V), [&](int64_t begin, int64_t end) {
      std::vector<float> row_values(V);  // the row in fp32: exact for every admitted dtype
      std::vector<int64_t> order(V);
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* row = xp + r * xl.row_stride;
        for (int64_t i = 0; i < V; ++i) row_values[i] = static_cast<float>(row[i]);
        std::iota(order.begin(), order.end(), int64_t{0});
        std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int64_t a, int64_t b) {
          return ranks_before(row_values[a], a, row_values[b], b);
        });
        for (int64_t j = 0; j < k; ++j) {
          vp[r * k + j] = row[order[j]];
          ip[r * k + j] = order[j];
        }
      }
    });
  });
  return {values, indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(hydra_fast, CPU, m) { m.impl("topk_rows", &topk_rows_cpu); }

}  // namespace hydra_fast

// topk_rows' inputs and outputs, shared by the CPU kernel and the CUDA glue: the checks (checks.h), the rows to
// read (x itself, or x.contiguous() when x has no equally spaced rows with a contiguous last dim) and the
// outputs values [..., k] (x's dtype) and indices int64 [..., k], contiguous.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "checks.h"

namespace hydra_fast {

struct TopkRowsIO {
  at::Tensor x;  // the rows read: [rows, V] with row stride layout.row_stride, last dim contiguous
  RowLayout layout;
  at::Tensor values, indices;  // [..., k] each
};

// layout: check_topk_rows(x, k)'s answer (the caller checks first).
inline TopkRowsIO topk_rows_io(const at::Tensor& x, int64_t k, const std::optional<RowLayout>& layout) {
  const int64_t V = x.size(-1);
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = k;
  return {layout ? x : x.contiguous(), layout ? *layout : RowLayout{x.numel() / V, V}, at::empty(shape, x.options()),
          at::empty(shape, x.options().dtype(at::kLong))};
}

}  // namespace hydra_fast

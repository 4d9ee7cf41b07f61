// x [M, K] @ weight [N, K].T + bias on the CPU for a few rows (a draft tree's nodes, a small batch): each weight row
// is read from memory once for all M rows. MKL's sgemm runs these shapes at a third of its one-row speed (576 x
// 3072: 0.24 ms at 1 row, 0.63 ms at 4; bench/RESULTS.md): it is memory-bound work that a GEMM blocks for compute.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace hydra_fast::cpu {

// Rows of x for which few_rows_linear is used: from 5 rows on MKL was as fast or faster (2 cores, fp32).
constexpr int64_t kFewRowsMax = 4;

// Whether few_rows_linear takes these inputs: fp32 on the CPU, 2..kFewRowsMax rows, rows of x and weight
// contiguous (x: one run of equally spaced rows, as checks.h's RowLayout), an fp32 bias or none.
bool few_rows_fits(const at::Tensor& x, int64_t rows, const at::Tensor& weight, const std::optional<at::Tensor>& bias);

// out [rows, N] (contiguous, viewed as x's leading shape by the caller) = x @ weight.T + bias, x's rows `row_stride`
// elements apart.
at::Tensor few_rows_linear(const at::Tensor& x, int64_t rows, int64_t row_stride, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias);

}  // namespace hydra_fast::cpu

// CPU draft head body: x = [hidden | embed[path_tokens]] gathered in one pass, then the block stack
// x <- res(x) + silu(W x + b) with at::linear (the same ops and dtypes as reference.draft_head_mlp).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "checks.h"

namespace hydra_fast {
namespace {

// x[r] = [hidden[r] | embed[tok[r, 0]] | ... | embed[tok[r, k-1]]], written once. x [R, (k+1)d] contiguous.
template <typename scalar_t>
void gather_inputs(const at::Tensor& hidden, const at::Tensor& path_tokens, const at::Tensor& embed, at::Tensor& x) {
  const int64_t R = hidden.size(0), d = hidden.size(1), k = path_tokens.size(1), V = embed.size(0);
  const scalar_t* hp = hidden.const_data_ptr<scalar_t>();
  const scalar_t* ep = embed.const_data_ptr<scalar_t>();  // last dim stride 1 (checked)
  const int64_t* tp = path_tokens.const_data_ptr<int64_t>();
  scalar_t* xp = x.mutable_data_ptr<scalar_t>();
  const int64_t hs0 = hidden.stride(0), hs1 = hidden.stride(1), es0 = embed.stride(0);
  const int64_t ts0 = path_tokens.stride(0), ts1 = path_tokens.stride(1);
  at::parallel_for(0, R, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* x_row = xp + r * (k + 1) * d;
      for (int64_t c = 0; c < d; ++c) x_row[c] = hp[r * hs0 + c * hs1];
      for (int64_t t = 0; t < k; ++t) {
        // A negative token counts from the end, as Python indexing in the reference does; then clamp so a
        // token outside [-V, V) cannot read out of bounds.
        int64_t tok = tp[r * ts0 + t * ts1];
        tok = std::clamp<int64_t>(tok < 0 ? tok + V : tok, 0, V - 1);
        std::copy_n(ep + tok * es0, d, x_row + (t + 1) * d);
      }
    }
  });
}

at::Tensor draft_head_mlp_cpu(const at::Tensor& hidden, const at::Tensor& path_tokens, const at::Tensor& embed,
                              at::TensorList weights, at::TensorList biases,
                              const std::optional<at::Tensor>& res_weight, const std::optional<at::Tensor>& res_bias) {
  check_draft_head_mlp(hidden, path_tokens, embed, weights, biases, res_weight, res_bias);
  const int64_t R = hidden.size(0), d = hidden.size(1), k = path_tokens.size(1);
  at::Tensor x = at::empty({R, (k + 1) * d}, hidden.options());  // [R, (k+1)d]
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hidden.scalar_type(), "hydra_fast.draft_head_mlp",
                                  [&] { gather_inputs<scalar_t>(hidden, path_tokens, embed, x); });
  for (size_t i = 0; i < weights.size(); ++i) {
    at::Tensor y = at::silu(at::linear(x, weights[i], biases[i]));  // [R, d]
    if (i == 0 && res_weight.has_value()) {
      x = at::linear(x, *res_weight, res_bias);  // [R, d]
    }
    // x is [R, d] and owned here (the gather buffer when k == 0, else a fresh linear output): add in place.
    x.add_(y);
  }
  return x;
}

}  // namespace

TORCH_LIBRARY_IMPL(hydra_fast, CPU, m) { m.impl("draft_head_mlp", &draft_head_mlp_cpu); }

}  // namespace hydra_fast

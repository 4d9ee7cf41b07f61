// CPU lossless tree sampling (point-mass multi-round rejection), see reference.accept_sample. One task per
// sequence walks the tree from the root (the batch's one tree, or the sequence's own for links [B, N]): the
// children of the expanded node are tried in first-child / next-sibling order, child c accepted when
// u[c] * (row total - rejected mass) < residual(c); the bonus token is the first vocabulary index whose running
// sum of the residual (rejected tokens zeroed, double, in order, as torch's CPU cumsum) exceeds u[0] * its total.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "checks.h"

namespace hydra_fast {
namespace {

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// The residual of one row: p with the rejected tokens' entries set to 0.
struct Residual {
  const float* row;
  std::vector<int64_t> rejected;  // distinct tokens, in rejection order
  double removed = 0.0;           // their mass

  double at(int64_t token) const {
    return std::find(rejected.begin(), rejected.end(), token) != rejected.end() ? 0.0
                                                                                : static_cast<double>(row[token]);
  }
  void reject(int64_t token) {
    const double p = at(token);
    if (p != 0.0) rejected.push_back(token), removed += p;
  }
  // The first index whose cumulative residual exceeds u * total, V - 1 when none does.
  int64_t inverse_cdf(int64_t V, float u) const {
    std::vector<int64_t> zeroed(rejected);
    std::sort(zeroed.begin(), zeroed.end());
    std::vector<double> cdf(V);
    double run = 0.0;
    size_t k = 0;
    for (int64_t v = 0; v < V; ++v) {
      const bool zero = k < zeroed.size() && zeroed[k] == v;
      if (zero) ++k;
      run += zero ? 0.0 : static_cast<double>(row[v]);
      cdf[v] = run;
    }
    const double target = static_cast<double>(u) * run;
    const int64_t below = std::upper_bound(cdf.begin(), cdf.end(), target) - cdf.begin();
    return std::min(below, V - 1);
  }
};

double row_total(const float* row, int64_t V) {
  double s = 0.0;
  for (int64_t v = 0; v < V; ++v) s += static_cast<double>(row[v]);
  return s;
}

Outputs accept_sample_cpu(const at::Tensor& probs, const at::Tensor& candidates, const at::Tensor& first_child,
                          const at::Tensor& next_sibling, const at::Tensor& uniform, int64_t max_depth) {
  check_accept_sample(probs, candidates, first_child, next_sibling, uniform, max_depth);
  const int64_t B = probs.size(0), N = probs.size(1), V = probs.size(2), L = max_depth + 1;
  const auto opts = probs.options().dtype(at::kLong);
  at::Tensor accept_len = at::empty({B}, opts), out_tokens = at::empty({B, L}, opts);
  at::Tensor accepted_nodes = at::empty({B, L}, opts);
  const at::Tensor fc_t = first_child.contiguous(), ns_t = next_sibling.contiguous();
  const int64_t links_sb = first_child.dim() == 2 ? N : 0;  // one tree per sequence [B, N], or one for all [N]
  const float* pp = probs.const_data_ptr<float>();
  const int64_t ps0 = probs.stride(0), ps1 = probs.stride(1);
  const int64_t* cand = candidates.const_data_ptr<int64_t>();
  const int64_t cs0 = candidates.stride(0), cs1 = candidates.stride(1);
  const float* uni = uniform.const_data_ptr<float>();
  const int64_t us0 = uniform.stride(0), us1 = uniform.stride(1);
  int64_t* acc_p = accept_len.mutable_data_ptr<int64_t>();
  int64_t* out_p = out_tokens.mutable_data_ptr<int64_t>();
  int64_t* nodes_p = accepted_nodes.mutable_data_ptr<int64_t>();
  // Links outside [-1, N) are clamped into range, as the reference's clamp(0, N - 1) does.
  auto clamp_node = [&](int64_t n) { return std::clamp<int64_t>(n, 0, N - 1); };

  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t* fc = fc_t.const_data_ptr<int64_t>() + b * links_sb;
      const int64_t* ns = ns_t.const_data_ptr<int64_t>() + b * links_sb;
      int64_t* nodes = nodes_p + b * L;
      std::fill(nodes, nodes + L, -1);
      nodes[0] = 0;
      auto token_of = [&](int64_t n) { return std::clamp<int64_t>(cand[b * cs0 + n * cs1], 0, V - 1); };
      Residual res{pp + b * ps0};
      double total = row_total(res.row, V);
      int64_t a = 0, child = fc[0];
      for (int64_t tests = 0; tests < N - 1 && child >= 0; ++tests) {  // each non-root node once at most
        const int64_t c = clamp_node(child);
        const int64_t tok = token_of(c);
        const double p_tok = res.at(tok);
        if (static_cast<double>(uni[b * us0 + c * us1]) * (total - res.removed) < p_tok) {
          ++a;
          nodes[std::min(a, L - 1)] = c;
          res = Residual{pp + b * ps0 + c * ps1};
          total = row_total(res.row, V);
          child = fc[c];
        } else {
          res.reject(tok);
          child = ns[c];
        }
      }
      const int64_t extra = res.inverse_cdf(V, uni[b * us0]);
      a = std::min(a, L - 1);
      acc_p[b] = a;
      for (int64_t j = 0; j < L; ++j) {
        out_p[b * L + j] = j < a ? token_of(clamp_node(nodes[j + 1])) : (j == a ? extra : -1);
      }
    }
  });
  return {accept_len, out_tokens, accepted_nodes};
}

}  // namespace

TORCH_LIBRARY_IMPL(hydra_fast, CPU, m) { m.impl("accept_sample", &accept_sample_cpu); }

}  // namespace hydra_fast

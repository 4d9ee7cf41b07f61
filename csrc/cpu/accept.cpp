// CPU tree acceptance, greedy and typical. Two stages: per (b, node) row statistics of the logits (argmax, or
// log-softmax normaliser and entropy) in parallel, then per sequence the walk over the paths (the batch's one
// tree, or the sequence's own for paths [B, P, L]). Tie-breaking is
// the reference's exactly: the first max in argmax, the first path of the longest accept length (greedy);
// the largest acc * 1e6 + score, first such path (typical); the first vocab index whose CDF exceeds u * total.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "checks.h"

namespace hydra_fast {
namespace {

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// One tree as its paths [P, L] describe it. Node indices outside [0, N) (a broken caller contract; the
// reference would raise) are treated as unmatched, so they are never used to index.
struct Tree {
  int64_t N, P, L;
  std::vector<int64_t> paths;    // [P, L], -1 padded
  std::vector<int64_t> parents;  // [N], parent of each node, -1 for the root

  Tree(const at::Tensor& paths_t, int64_t num_nodes) : N(num_nodes), P(paths_t.size(0)), L(paths_t.size(1)) {
    const at::Tensor pc = paths_t.contiguous();
    paths.assign(pc.const_data_ptr<int64_t>(), pc.const_data_ptr<int64_t>() + P * L);
    parents.assign(N, -1);
    // Every (parent, child) pair along a path; a child has one parent, so the order does not matter.
    for (int64_t p = 0; p < P; ++p) {
      for (int64_t j = 1; j < L; ++j) {
        const int64_t child = at(p, j);
        if (child >= 0 && child < N) parents[child] = at(p, j - 1);
      }
    }
  }
  int64_t at(int64_t p, int64_t j) const { return paths[p * L + j]; }
  // The row whose distribution judged `node`'s token: its parent, the root's own row for the root.
  int64_t parent_row(int64_t node) const { return std::clamp<int64_t>(parents[node], 0, N - 1); }
  bool in_range(int64_t node) const { return node >= 0 && node < N; }

  // Accepted drafts along path p: the leading nodes after the root whose token matched.
  template <typename Match>
  int64_t accept_len(int64_t p, const Match& match) const {
    int64_t a = 0;
    while (a + 1 < L && in_range(at(p, a + 1)) && match(at(p, a + 1))) ++a;
    return a;
  }
};

// The trees of a batch: paths [P, L] give one tree shared by every sequence, paths [B, P, L] one per sequence
// (each with its own parents).
struct Trees {
  std::vector<Tree> trees;
  int64_t L;

  Trees(const at::Tensor& paths, int64_t num_nodes) : L(paths.size(-1)) {
    if (paths.dim() == 2) {
      trees.emplace_back(paths, num_nodes);
    } else {
      for (int64_t b = 0; b < paths.size(0); ++b) trees.emplace_back(paths.select(0, b), num_nodes);
    }
  }
  const Tree& operator[](int64_t b) const { return trees.size() == 1 ? trees[0] : trees[b]; }
};

// accept_len [B], out_tokens [B, L] and accepted_nodes [B, L] for sequence b, as reference._gather_outputs.
void write_outputs(const Tree& tree, int64_t b, int64_t best, int64_t a, int64_t extra, const int64_t* cand,
                   int64_t cand_s0, int64_t cand_s1, int64_t* accept_len, int64_t* out_tokens,
                   int64_t* accepted_nodes) {
  const int64_t L = tree.L;
  accept_len[b] = a;
  for (int64_t j = 0; j < L; ++j) {
    accepted_nodes[b * L + j] = j <= a ? tree.at(best, j) : -1;
    int64_t token = -1;
    if (j < a) {
      const int64_t next = std::clamp<int64_t>(tree.at(best, j + 1), 0, tree.N - 1);
      token = cand[b * cand_s0 + next * cand_s1];
    } else if (j == a) {
      token = extra;
    }
    out_tokens[b * L + j] = token;
  }
}

Outputs empty_outputs(const at::Tensor& logits, int64_t L) {
  const int64_t B = logits.size(0);
  const auto opts = logits.options().dtype(at::kLong);
  return {at::empty({B}, opts), at::empty({B, L}, opts), at::empty({B, L}, opts)};
}

// argmax over V of each logits row in float, the first max (NaN counts as the max, as in torch.argmax).
template <typename scalar_t>
void row_argmax(const at::Tensor& logits, std::vector<int64_t>& argmax) {
  const int64_t B = logits.size(0), N = logits.size(1), V = logits.size(2);
  const scalar_t* lp = logits.const_data_ptr<scalar_t>();
  const int64_t s0 = logits.stride(0), s1 = logits.stride(1);
  at::parallel_for(0, B * N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t* x = lp + (row / N) * s0 + (row % N) * s1;
      float best = static_cast<float>(x[0]);
      int64_t idx = 0;
      for (int64_t v = 1; v < V && !std::isnan(best); ++v) {
        const float xv = static_cast<float>(x[v]);
        if (xv > best || std::isnan(xv)) best = xv, idx = v;
      }
      argmax[row] = idx;
    }
  });
}

Outputs accept_greedy_cpu(const at::Tensor& logits, const at::Tensor& candidates, const at::Tensor& paths) {
  check_accept("accept_greedy", logits, candidates, paths);
  const int64_t B = logits.size(0), N = logits.size(1);
  const Trees trees(paths, N);
  std::vector<int64_t> argmax(B * N);  // [B, N]
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "hydra_fast.accept_greedy",
                                  [&] { row_argmax<scalar_t>(logits, argmax); });
  auto [accept_len, out_tokens, accepted_nodes] = empty_outputs(logits, trees.L);
  const int64_t* cand = candidates.const_data_ptr<int64_t>();
  const int64_t cs0 = candidates.stride(0), cs1 = candidates.stride(1);
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const Tree& tree = trees[b];
      const int64_t* am = argmax.data() + b * N;
      auto match = [&](int64_t node) { return am[tree.parent_row(node)] == cand[b * cs0 + node * cs1]; };
      int64_t best = 0, best_len = -1;
      for (int64_t p = 0; p < tree.P; ++p) {
        const int64_t a = tree.accept_len(p, match);
        if (a > best_len) best = p, best_len = a;
      }
      const int64_t last = std::clamp<int64_t>(tree.at(best, best_len), 0, N - 1);
      write_outputs(tree, b, best, best_len, am[last], cand, cs0, cs1, accept_len.mutable_data_ptr<int64_t>(),
                    out_tokens.mutable_data_ptr<int64_t>(), accepted_nodes.mutable_data_ptr<int64_t>());
    }
  });
  return {accept_len, out_tokens, accepted_nodes};
}

// Per row of logits / T in double: the row max, log(sum exp(x - max)) and the entropy of the softmax.
struct RowStats {
  double max, log_sum, entropy;
};

template <typename scalar_t>
void row_stats(const at::Tensor& logits, double temperature, std::vector<RowStats>& stats) {
  const int64_t B = logits.size(0), N = logits.size(1), V = logits.size(2);
  const scalar_t* lp = logits.const_data_ptr<scalar_t>();
  const int64_t s0 = logits.stride(0), s1 = logits.stride(1);
  at::parallel_for(0, B * N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t* x = lp + (row / N) * s0 + (row % N) * s1;
      double mx = -std::numeric_limits<double>::infinity();
      for (int64_t v = 0; v < V; ++v) mx = std::max(mx, static_cast<double>(x[v]) / temperature);
      double sum = 0.0;
      for (int64_t v = 0; v < V; ++v) sum += std::exp(static_cast<double>(x[v]) / temperature - mx);
      const double log_sum = std::log(sum);
      double entropy = 0.0;
      for (int64_t v = 0; v < V; ++v) {
        const double logp = (static_cast<double>(x[v]) / temperature - mx) - log_sum;
        const double term = std::exp(logp) * logp;
        entropy -= std::isnan(term) ? 0.0 : term;  // 0 * log 0 counts as 0
      }
      stats[row] = {mx, log_sum, entropy};
    }
  });
}

template <typename scalar_t>
Outputs accept_typical_impl(const at::Tensor& logits, const at::Tensor& candidates, const Trees& trees,
                            const float* uniform, int64_t uniform_s0, double temperature, double posterior_threshold,
                            double posterior_alpha) {
  const int64_t B = logits.size(0), N = logits.size(1), V = logits.size(2), L = trees.L;
  std::vector<RowStats> stats(B * N);  // [B, N]
  row_stats<scalar_t>(logits, temperature, stats);
  auto [accept_len, out_tokens, accepted_nodes] = empty_outputs(logits, L);
  const scalar_t* lp = logits.const_data_ptr<scalar_t>();
  const int64_t ls0 = logits.stride(0), ls1 = logits.stride(1);
  const int64_t* cand = candidates.const_data_ptr<int64_t>();
  const int64_t cs0 = candidates.stride(0), cs1 = candidates.stride(1);

  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> cand_logp(N);
    std::vector<char> match(N);
    std::vector<double> cdf(V);
    for (int64_t b = begin; b < end; ++b) {
      const Tree& tree = trees[b];
      auto logp = [&](int64_t row, int64_t v) {
        const RowStats& st = stats[b * N + row];
        return (static_cast<double>(lp[b * ls0 + row * ls1 + v]) / temperature - st.max) - st.log_sum;
      };
      for (int64_t n = 0; n < N; ++n) {
        const int64_t par = tree.parent_row(n);
        // A negative token counts from the end (Python indexing in the reference), then clamp into [0, V).
        int64_t tok = cand[b * cs0 + n * cs1];
        tok = std::clamp<int64_t>(tok < 0 ? tok + V : tok, 0, V - 1);
        cand_logp[n] = logp(par, tok);
        const double threshold =
            std::min(posterior_alpha * std::exp(-stats[b * N + par].entropy), posterior_threshold);
        match[n] = std::exp(cand_logp[n]) > threshold;
      }
      // Longest path first, then the highest total log-probability, then the lowest index: the key is the
      // reference's acc * 1e6 + score, so near-ties round the same way.
      int64_t best = 0, best_len = 0;
      double best_key = -std::numeric_limits<double>::infinity();
      for (int64_t p = 0; p < tree.P; ++p) {
        const int64_t a = tree.accept_len(p, [&](int64_t node) { return match[node] != 0; });
        double score = 0.0;
        for (int64_t j = 1; j <= a; ++j) score += cand_logp[tree.at(p, j)];
        const double key = static_cast<double>(a) * 1e6 + score;
        if (p == 0 || key > best_key) best = p, best_len = a, best_key = key;
      }
      // The extra token: inverse CDF of p at the last accepted node, the first v with cdf[v] > u * cdf[V-1].
      const int64_t last = std::clamp<int64_t>(tree.at(best, best_len), 0, N - 1);
      double total = 0.0;
      for (int64_t v = 0; v < V; ++v) total += std::exp(logp(last, v)), cdf[v] = total;
      const double target = static_cast<double>(uniform[b * uniform_s0]) * total;
      const int64_t below = std::upper_bound(cdf.begin(), cdf.end(), target) - cdf.begin();
      const int64_t extra = std::min(below, V - 1);
      write_outputs(tree, b, best, best_len, extra, cand, cs0, cs1, accept_len.mutable_data_ptr<int64_t>(),
                    out_tokens.mutable_data_ptr<int64_t>(), accepted_nodes.mutable_data_ptr<int64_t>());
    }
  });
  return {accept_len, out_tokens, accepted_nodes};
}

Outputs accept_typical_cpu(const at::Tensor& logits, const at::Tensor& candidates, const at::Tensor& paths,
                           const at::Tensor& uniform, double temperature, double posterior_threshold,
                           double posterior_alpha) {
  check_accept("accept_typical", logits, candidates, paths);
  check_accept_typical_extra(logits, uniform, temperature, posterior_threshold, posterior_alpha);
  const Trees trees(paths, logits.size(1));
  Outputs out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "hydra_fast.accept_typical", [&] {
    out = accept_typical_impl<scalar_t>(logits, candidates, trees, uniform.const_data_ptr<float>(), uniform.stride(0),
                                        temperature, posterior_threshold, posterior_alpha);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(hydra_fast, CPU, m) {
  m.impl("accept_greedy", &accept_greedy_cpu);
  m.impl("accept_typical", &accept_typical_cpu);
}

}  // namespace hydra_fast

// CPU layout of a dynamic draft tree (reference.dynamic_tree_layout), one sequence per task: keep the `nodes`
// best candidates by (score desc, candidate index asc), number them in candidate order after the root, append
// the context chain, then walk parents for paths, mask rows and child lists.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#include "checks.h"

namespace hydra_fast {
namespace {

// The selection order as one unsigned key, smaller first: the score's bits mapped to an unsigned order (NaN
// above +inf, -0.0 equal to +0.0, as torch.sort orders them), inverted for descending, then the candidate
// index for ties. kernels/dynamic_tree_layout.cuh builds the same key.
uint64_t rank_key(float score, int64_t c) {
  uint32_t u;
  std::memcpy(&u, &score, sizeof(u));
  uint32_t ord;
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    ord = 0xffffffffu;  // NaN: first, as torch.sort(descending=True) puts it
  } else {
    if (u == 0x80000000u) u = 0;  // -0.0 ties with +0.0
    ord = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  }
  return (static_cast<uint64_t>(~ord) << 32) | static_cast<uint64_t>(c);
}

struct Scratch {
  std::vector<uint64_t> keys;  // [C]
  std::vector<int64_t> slot;   // [C] candidate -> node index, 0 where not kept (the root)
  std::vector<int64_t> par;    // [N] parent node, -1 for the root
  std::vector<int64_t> last;   // [N] child-list building: the lowest child seen so far
  std::vector<int64_t> anc;    // [L] the k-th ancestor of a node
};

struct Layout {
  at::Tensor kept, paths, tree_mask, depth, first_child, next_sibling;
};

void layout_one(const at::Tensor& score, const at::Tensor& parent, const at::Tensor& candidate_depth, int64_t b,
                int64_t nodes, int64_t M, int64_t L, Layout& out, Scratch& s) {
  const int64_t C = score.size(1), Nh = 1 + nodes, N = Nh + M;
  const float* sc = score.const_data_ptr<float>() + b * score.stride(0);
  const int64_t* pa = parent.const_data_ptr<int64_t>() + b * parent.stride(0);
  const int64_t* cd = candidate_depth.const_data_ptr<int64_t>();
  const int64_t ss = score.stride(1), ps = parent.stride(1), ds = candidate_depth.stride(0);
  int64_t* kept = out.kept.mutable_data_ptr<int64_t>() + b * nodes;
  int64_t* paths = out.paths.mutable_data_ptr<int64_t>() + b * N * L;
  bool* mask = out.tree_mask.mutable_data_ptr<bool>() + b * N * N;
  int64_t* depth = out.depth.mutable_data_ptr<int64_t>() + b * N;
  int64_t* first_child = out.first_child.mutable_data_ptr<int64_t>() + b * N;
  int64_t* next_sibling = out.next_sibling.mutable_data_ptr<int64_t>() + b * N;

  // the kept set: the `nodes` smallest keys, then in candidate order
  s.keys.resize(C);
  for (int64_t c = 0; c < C; ++c) s.keys[c] = rank_key(sc[c * ss], c);
  std::nth_element(s.keys.begin(), s.keys.begin() + (nodes - 1), s.keys.end());
  for (int64_t i = 0; i < nodes; ++i) kept[i] = static_cast<int64_t>(s.keys[i] & 0xffffffffu);
  std::sort(kept, kept + nodes);
  s.slot.assign(C, 0);
  for (int64_t i = 0; i < nodes; ++i) s.slot[kept[i]] = i + 1;

  // parents and depths: root, kept candidates, context chain
  s.par.assign(N, -1);
  depth[0] = 0;
  for (int64_t i = 1; i < Nh; ++i) {
    const int64_t c = kept[i - 1], p = pa[c * ps];
    s.par[i] = (p < 0 || p >= C) ? 0 : s.slot[p];
    depth[i] = cd[c * ds];
  }
  for (int64_t m = 0; m < M; ++m) {
    s.par[Nh + m] = m == 0 ? 0 : Nh + m - 1;
    depth[Nh + m] = m + 1;
  }

  // paths (column c: the depth-c ancestor) and mask rows (the nodes on the path)
  s.anc.resize(L);
  std::memset(mask, 0, static_cast<size_t>(N * N));
  for (int64_t n = 0; n < N; ++n) {
    s.anc[0] = n;
    for (int64_t k = 1; k < L; ++k) s.anc[k] = s.anc[k - 1] < 0 ? -1 : s.par[s.anc[k - 1]];
    for (int64_t c = 0; c < L; ++c) {
      const int64_t node = c <= depth[n] ? s.anc[std::min(depth[n] - c, L - 1)] : -1;
      paths[n * L + c] = node;
      if (node >= 0) mask[n * N + node] = true;
    }
  }

  // child lists in index order: walking down from the last node, each node's next sibling is the lowest
  // later child of its parent seen so far
  s.last.assign(N, -1);
  for (int64_t j = N - 1; j >= 0; --j) {
    const int64_t p = s.par[j];
    next_sibling[j] = p >= 0 ? s.last[p] : -1;
    if (p >= 0) s.last[p] = j;
  }
  std::copy(s.last.begin(), s.last.end(), first_child);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dynamic_tree_layout_cpu(
    const at::Tensor& score, const at::Tensor& parent, const at::Tensor& candidate_depth, int64_t nodes,
    int64_t context_len, int64_t max_depth) {
  check_dynamic_tree_layout(score, parent, candidate_depth, nodes, context_len, max_depth);
  const int64_t B = score.size(0), N = 1 + nodes + context_len, L = max_depth + 1;
  TORCH_CHECK(score.size(1) <= 0xffffffffLL, "hydra_fast.dynamic_tree_layout: C must be < 2^32, got ",
              score.size(1));
  const auto i64 = score.options().dtype(at::kLong);
  Layout out{at::empty({B, nodes}, i64), at::empty({B, N, L}, i64),
             at::empty({B, N, N}, score.options().dtype(at::kBool)), at::empty({B, N}, i64), at::empty({B, N}, i64),
             at::empty({B, N}, i64)};
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    Scratch s;
    for (int64_t b = begin; b < end; ++b) layout_one(score, parent, candidate_depth, b, nodes, context_len, L, out, s);
  });
  return {out.kept, out.paths, out.tree_mask, out.depth, out.first_child, out.next_sibling};
}

}  // namespace

TORCH_LIBRARY_IMPL(hydra_fast, CPU, m) { m.impl("dynamic_tree_layout", &dynamic_tree_layout_cpu); }

}  // namespace hydra_fast

// CPU KV compaction, in place: for every (layer, b, kv head), slot len + accepted_nodes[b, j] moves to len + j.
// Each (layer, b, head) first reads all its accepted rows, then writes them, exactly the reference's "gather
// everything, then scatter" order, so the result does not depend on source and destination slots overlapping.
// Rows are moved as bytes: the op is a pure copy, the same for every dtype.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "checks.h"

namespace hydra_fast {
namespace {

struct Move {
  int64_t src, dst;  // slots in [0, S)
};

void compact_one(const at::Tensor& cache, const std::vector<std::vector<Move>>& moves) {
  const int64_t Lyr = cache.size(0), B = cache.size(1), H = cache.size(2), D = cache.size(4);
  const int64_t row_bytes = D * cache.element_size();  // last dim has stride 1 (checked)
  const int64_t s0 = cache.stride(0), s1 = cache.stride(1), s2 = cache.stride(2), s3 = cache.stride(3);
  char* base = static_cast<char*>(cache.mutable_data_ptr());
  const int64_t elem = cache.element_size();
  at::parallel_for(0, Lyr * B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<char> staged;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t h = task % H, b = (task / H) % B, layer = task / (H * B);
      const std::vector<Move>& mv = moves[b];
      if (mv.empty()) continue;
      char* head = base + (layer * s0 + b * s1 + h * s2) * elem;
      staged.resize(mv.size() * row_bytes);
      for (size_t m = 0; m < mv.size(); ++m) {
        std::memcpy(staged.data() + m * row_bytes, head + mv[m].src * s3 * elem, row_bytes);
      }
      for (size_t m = 0; m < mv.size(); ++m) {
        std::memcpy(head + mv[m].dst * s3 * elem, staged.data() + m * row_bytes, row_bytes);
      }
    }
  });
}

void kv_compact_cpu(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& cache_lens,
                    const at::Tensor& accepted_nodes) {
  check_kv_compact(k_cache, v_cache, cache_lens, accepted_nodes);
  const int64_t B = accepted_nodes.size(0), Lp = accepted_nodes.size(1), S = k_cache.size(3);
  const at::Tensor lens = cache_lens.contiguous();
  const at::Tensor nodes = accepted_nodes.contiguous();
  const int32_t* lp = lens.const_data_ptr<int32_t>();
  const int64_t* np = nodes.const_data_ptr<int64_t>();
  // The moves of each sequence: -1 (any negative) entries stay put. Slots are clamped into [0, S) as the
  // reference clamps them to S - 1, so a broken caller contract never writes out of bounds.
  std::vector<std::vector<Move>> moves(B);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t j = 0; j < Lp; ++j) {
      const int64_t node = np[b * Lp + j];
      if (node < 0) continue;
      const int64_t src = std::clamp<int64_t>(lp[b] + node, 0, S - 1);
      const int64_t dst = std::clamp<int64_t>(lp[b] + j, 0, S - 1);
      if (src != dst) moves[b].push_back({src, dst});
    }
  }
  compact_one(k_cache, moves);
  compact_one(v_cache, moves);
}

}  // namespace

TORCH_LIBRARY_IMPL(hydra_fast, CPU, m) { m.impl("kv_compact", &kv_compact_cpu); }

}  // namespace hydra_fast

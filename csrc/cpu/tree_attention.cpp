// CPU tree attention: for each (b, q head, query) row, an online softmax over the positions the row may see,
// the cache [0, len) and the tree slots len + j with tree_mask[i, j], in chunks of kChunk positions.
// Scores, softmax and the weighted sum of V are all accumulated in float. See reference.tree_attention.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "checks.h"

namespace hydra_fast {
namespace {

constexpr int64_t kChunk = 64;

template <typename scalar_t>
void tree_attention_rows(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                         const int32_t* lens, const bool* mask, float scale, at::Tensor& out) {
  const int64_t B = q.size(0), Hq = q.size(1), N = q.size(2), D = q.size(3);
  const int64_t Hkv = k_cache.size(1), S = k_cache.size(2);
  const int64_t group = Hq / Hkv;
  // The last dim of q, k_cache and v_cache has stride 1 (checked); the others may be anything.
  const scalar_t* qp = q.const_data_ptr<scalar_t>();
  const scalar_t* kp = k_cache.const_data_ptr<scalar_t>();
  const scalar_t* vp = v_cache.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();  // [B, N, Hq, D] contiguous
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), qs2 = q.stride(2);
  const int64_t ks0 = k_cache.stride(0), ks1 = k_cache.stride(1), ks2 = k_cache.stride(2);
  const int64_t vs0 = v_cache.stride(0), vs1 = v_cache.stride(1), vs2 = v_cache.stride(2);
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();

  at::parallel_for(0, B * Hq * N, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(D), acc(D), scores(kChunk);
    std::vector<int64_t> pos(kChunk);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t i = row % N;
      const int64_t h = (row / N) % Hq;
      const int64_t b = row / (N * Hq);
      const scalar_t* k_bh = kp + b * ks0 + (h / group) * ks1;
      const scalar_t* v_bh = vp + b * vs0 + (h / group) * vs1;
      const scalar_t* q_row = qp + b * qs0 + h * qs1 + i * qs2;
      for (int64_t d = 0; d < D; ++d) qf[d] = static_cast<float>(q_row[d]);
      std::fill(acc.begin(), acc.end(), 0.f);
      float m = kNegInf, l = 0.f;

      auto flush = [&](int64_t count) {
        float chunk_max = kNegInf;
        for (int64_t c = 0; c < count; ++c) {
          const scalar_t* k_row = k_bh + pos[c] * ks2;
          float s = 0.f;
          for (int64_t d = 0; d < D; ++d) s += qf[d] * static_cast<float>(k_row[d]);
          scores[c] = s * scale;
          chunk_max = std::max(chunk_max, scores[c]);
        }
        const float m_new = std::max(m, chunk_max);
        if (m_new == kNegInf) return;  // nothing finite yet: exp(-inf - -inf) would be NaN
        const float correction = std::exp(m - m_new);
        if (correction != 1.f) {
          l *= correction;
          for (int64_t d = 0; d < D; ++d) acc[d] *= correction;
        }
        for (int64_t c = 0; c < count; ++c) {
          const float p = std::exp(scores[c] - m_new);
          l += p;
          const scalar_t* v_row = v_bh + pos[c] * vs2;
          for (int64_t d = 0; d < D; ++d) acc[d] += p * static_cast<float>(v_row[d]);
        }
        m = m_new;
      };

      // Visible positions: the cache [0, len), then tree slot len + j where tree_mask[i, j] and it fits in S.
      // Any len (even < 0 or > S) gives exactly the reference's set, and never an index outside [0, S).
      const int64_t len = lens[b];
      int64_t count = 0;
      const int64_t cache_end = std::clamp<int64_t>(len, 0, S);
      for (int64_t s = 0; s < cache_end; ++s) {
        pos[count++] = s;
        if (count == kChunk) flush(count), count = 0;
      }
      for (int64_t j = 0; j < N; ++j) {
        const int64_t s = len + j;
        if (s < 0 || s >= S || !mask[i * N + j]) continue;
        pos[count++] = s;
        if (count == kChunk) flush(count), count = 0;
      }
      if (count > 0) flush(count);

      // A row that sees nothing gives 0 / 0 = NaN, as the reference's softmax over all -inf does.
      scalar_t* o_row = op + ((b * N + i) * Hq + h) * D;
      for (int64_t d = 0; d < D; ++d) o_row[d] = static_cast<scalar_t>(acc[d] / l);
    }
  });
}

at::Tensor tree_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                              const at::Tensor& cache_lens, const at::Tensor& tree_mask, double scale) {
  check_tree_attention(q, k_cache, v_cache, cache_lens, tree_mask, scale);
  const int64_t B = q.size(0), Hq = q.size(1), N = q.size(2), D = q.size(3);
  at::Tensor out = at::empty({B, N, Hq, D}, q.options());  // [B, N, Hq, D]
  const at::Tensor lens = cache_lens.contiguous();
  const at::Tensor mask = tree_mask.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "hydra_fast.tree_attention", [&] {
    tree_attention_rows<scalar_t>(q, k_cache, v_cache, lens.const_data_ptr<int32_t>(), mask.const_data_ptr<bool>(),
                                  static_cast<float>(scale), out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(hydra_fast, CPU, m) { m.impl("tree_attention", &tree_attention_cpu); }

}  // namespace hydra_fast

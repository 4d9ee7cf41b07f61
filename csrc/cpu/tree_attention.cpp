// CPU tree attention: for each (b, q head, query) row, an online softmax over the positions the row may see,
// the cache [0, len) and the tree slots len + j with tree_mask[i, j] (tree_mask[b, i, j] for a mask per
// sequence), in chunks of kChunk positions.
// Scores, softmax and the weighted sum of V are all accumulated in float. See reference.tree_attention.
// K and V are read as float: the visible prefix of a bf16/fp16 cache is converted once per call (vectorized by
// ATen), since every row of it is read by N * Hq / Hkv queries; an fp32 cache is used as it is.
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

// q . k with kLanes independent partial sums, so the compiler can vectorize the reduction.
inline float dot(const float* q, const float* k, int64_t D) {
  constexpr int64_t kLanes = 8;
  float part[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
    for (int64_t u = 0; u < kLanes; ++u) part[u] += q[d + u] * k[d + u];
  }
  for (; d < D; ++d) part[0] += q[d] * k[d];
  float s = 0.f;
  for (int64_t u = 0; u < kLanes; ++u) s += part[u];
  return s;
}

// k, v: float [B, Hkv, S, D], the cache's visible prefix (positions past it are seen by no query, so bounding
// positions by this S gives the same set as bounding them by the full cache's).
// mask: [N, N] contiguous, sequence b's at mask + b * mask_sb (0 for one mask shared by the batch).
template <typename scalar_t>
void tree_attention_rows(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const int32_t* lens,
                         const bool* mask, int64_t mask_sb, float scale, at::Tensor& out) {
  const int64_t B = q.size(0), Hq = q.size(1), N = q.size(2), D = q.size(3);
  const int64_t S = k.size(2), group = Hq / k.size(1);
  // The last dim of q, k and v has stride 1 (checked); the others may be anything.
  const scalar_t* qp = q.const_data_ptr<scalar_t>();
  const float* kp = k.const_data_ptr<float>();
  const float* vp = v.const_data_ptr<float>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();  // [B, N, Hq, D] contiguous
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), qs2 = q.stride(2);
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1), vs2 = v.stride(2);
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();

  at::parallel_for(0, B * Hq * N, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(D), acc(D), scores(kChunk);
    std::vector<int64_t> pos(kChunk);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t i = row % N;
      const int64_t h = (row / N) % Hq;
      const int64_t b = row / (N * Hq);
      const float* k_bh = kp + b * ks0 + (h / group) * ks1;
      const float* v_bh = vp + b * vs0 + (h / group) * vs1;
      const scalar_t* q_row = qp + b * qs0 + h * qs1 + i * qs2;
      const bool* mask_row = mask + b * mask_sb + i * N;
      for (int64_t d = 0; d < D; ++d) qf[d] = static_cast<float>(q_row[d]);
      std::fill(acc.begin(), acc.end(), 0.f);
      float m = kNegInf, l = 0.f;

      auto flush = [&](int64_t count) {
        float chunk_max = kNegInf;
        for (int64_t c = 0; c < count; ++c) {
          scores[c] = dot(qf.data(), k_bh + pos[c] * ks2, D) * scale;
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
          const float* v_row = v_bh + pos[c] * vs2;
          for (int64_t d = 0; d < D; ++d) acc[d] += p * v_row[d];
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
        if (s < 0 || s >= S || !mask_row[j]) continue;
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
  const at::Tensor mask = tree_mask.contiguous();  // [N, N] or [B, N, N]
  const int64_t mask_sb = tree_mask.dim() == 3 ? N * N : 0;
  // No query sees a position at or past max_b clamp(len + N, 0, S): convert only that prefix.
  const int64_t S = k_cache.size(2);
  int64_t visible = 0;  // the max over b of what sequence b's queries can see
  for (int64_t b = 0; b < B; ++b) {
    visible = std::max(visible, std::clamp<int64_t>(int64_t{lens.const_data_ptr<int32_t>()[b]} + N, 0, S));
  }
  const at::Tensor k = k_cache.narrow(2, 0, visible).to(at::kFloat);  // [B, Hkv, visible, D]
  const at::Tensor v = v_cache.narrow(2, 0, visible).to(at::kFloat);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "hydra_fast.tree_attention", [&] {
    tree_attention_rows<scalar_t>(q, k, v, lens.const_data_ptr<int32_t>(), mask.const_data_ptr<bool>(),
                                  mask_sb, static_cast<float>(scale), out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(hydra_fast, CPU, m) { m.impl("tree_attention", &tree_attention_cpu); }

}  // namespace hydra_fast

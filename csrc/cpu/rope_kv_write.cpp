// CPU rope_kv_write: one token (b, n) at a time, tokens split across threads. For each head of q|k|v: q and k
// are normalised per head (when q_norm / k_norm are given) and rotated, v is copied; q goes to the output and
// k, v to cache[layer, b, :, cache_lens[b] + n]. A slot outside [0, S) is skipped: nothing is written for it.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "checks.h"
#include "cpu/layer_math.h"

namespace hydra_fast {
namespace {

// v <- v * cos + rotate_half(v) * sin, each product rounded to T, then the sum (reference.rope_kv_write).
template <typename T>
void rotate(float* v, const T* cos, const T* sin, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = v[i], b = v[i + half];
    const float c0 = static_cast<float>(cos[i]), c1 = static_cast<float>(cos[i + half]);
    const float s0 = static_cast<float>(sin[i]), s1 = static_cast<float>(sin[i + half]);
    v[i] = cpu_math::round_to<T>(cpu_math::round_to<T>(a * c0) + cpu_math::round_to<T>(-b * s0));
    v[i + half] = cpu_math::round_to<T>(cpu_math::round_to<T>(b * c1) + cpu_math::round_to<T>(a * s1));
  }
}

template <typename T>
void rope_kv_write_impl(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& k_cache,
                        const at::Tensor& v_cache, int64_t layer, const at::Tensor& cache_lens, int64_t Hq,
                        int64_t Hkv, const std::optional<at::Tensor>& q_norm, const std::optional<at::Tensor>& k_norm,
                        float eps, at::Tensor& q_out) {
  const int64_t B = qkv.size(0), N = qkv.size(1), D = cos.size(2), S = k_cache.size(3);
  const T* qkv_p = qkv.const_data_ptr<T>();
  const T* cos_p = cos.const_data_ptr<T>();
  const T* sin_p = sin.const_data_ptr<T>();
  const T* qn = q_norm ? q_norm->const_data_ptr<T>() : nullptr;
  const T* kn = k_norm ? k_norm->const_data_ptr<T>() : nullptr;
  const int32_t* lens = cache_lens.const_data_ptr<int32_t>();
  T* q_p = q_out.mutable_data_ptr<T>();  // [B, N, Hq, D], contiguous
  T* cache_p[2] = {k_cache.mutable_data_ptr<T>(), v_cache.mutable_data_ptr<T>()};
  const at::Tensor* caches[2] = {&k_cache, &v_cache};
  at::parallel_for(0, B * N, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> v(D);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / N, n = t % N;
      const T* src = qkv_p + b * qkv.stride(0) + n * qkv.stride(1);
      const T* c = cos_p + b * cos.stride(0) + n * cos.stride(1);
      const T* s = sin_p + b * sin.stride(0) + n * sin.stride(1);
      const int64_t slot = static_cast<int64_t>(lens[b * cache_lens.stride(0)]) + n;
      const bool in_cache = slot >= 0 && slot < S;
      for (int64_t h = 0; h < Hq + 2 * Hkv; ++h) {
        const int which = h < Hq ? 0 : h < Hq + Hkv ? 1 : 2;  // q, k, v
        if (which > 0 && !in_cache) continue;
        for (int64_t i = 0; i < D; ++i) v[i] = static_cast<float>(src[h * D + i]);
        const T* norm = which == 0 ? qn : which == 1 ? kn : nullptr;
        if (norm) cpu_math::rms_norm_row<T>(v.data(), norm, D, eps);
        if (which < 2) rotate<T>(v.data(), c, s, D);
        T* dst;
        if (which == 0) {
          dst = q_p + (t * Hq + h) * D;
        } else {
          const at::Tensor& cache = *caches[which - 1];
          const int64_t kv_head = h - Hq - (which == 2 ? Hkv : 0);
          dst = cache_p[which - 1] + layer * cache.stride(0) + b * cache.stride(1) + kv_head * cache.stride(2) +
                slot * cache.stride(3);
        }
        for (int64_t i = 0; i < D; ++i) dst[i] = static_cast<T>(v[i]);
      }
    }
  });
}

at::Tensor rope_kv_write_cpu(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                             const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t layer,
                             const at::Tensor& cache_lens, int64_t num_q_heads, int64_t num_kv_heads,
                             const std::optional<at::Tensor>& q_norm, const std::optional<at::Tensor>& k_norm,
                             double eps) {
  check_rope_kv_write(qkv, cos, sin, k_cache, v_cache, layer, cache_lens, num_q_heads, num_kv_heads, q_norm, k_norm,
                      eps);
  const int64_t B = qkv.size(0), N = qkv.size(1), D = cos.size(2);
  at::Tensor q = at::empty({B, N, num_q_heads, D}, qkv.options());  // [B, N, Hq, D]
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "hydra_fast.rope_kv_write", [&] {
    rope_kv_write_impl<scalar_t>(qkv, cos, sin, k_cache, v_cache, layer, cache_lens, num_q_heads, num_kv_heads,
                                 q_norm, k_norm, static_cast<float>(eps), q);
  });
  return q;
}

}  // namespace

TORCH_LIBRARY_IMPL(hydra_fast, CPU, m) { m.impl("rope_kv_write", &rope_kv_write_cpu); }

}  // namespace hydra_fast

// The few-rows CPU product (few_rows_linear.h). Each task takes two weight rows at a time and all of x's rows in
// groups of four: 8 fp32 accumulators of 8 lanes (AVX2 + FMA when the CPU has them, checked at run time; else a
// portable loop), so the two weight rows stream through once while x (a few KB) stays in L1. Sums run in another
// order than MKL's, so results agree with at::linear to fp32 rounding.
#include "cpu/few_rows_linear.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define HF_X86 1
#endif

namespace hydra_fast::cpu {
namespace {

struct Args {
  const float* x;
  int64_t ldx, M;
  const float* w;
  int64_t ldw, K;
  const float* bias;
  float* out;  // [M, N]
  int64_t N;
};

// out[m, n] for n in [n0, n0 + nn) (nn <= 2) and m in [m0, m0 + mm) (mm <= 4): the portable loop.
void block_scalar(const Args& a, int64_t n0, int64_t nn, int64_t m0, int64_t mm) {
  for (int64_t i = 0; i < nn; ++i) {
    const float* w = a.w + (n0 + i) * a.ldw;
    for (int64_t j = 0; j < mm; ++j) {
      const float* x = a.x + (m0 + j) * a.ldx;
      float acc = 0.0f;
      for (int64_t k = 0; k < a.K; ++k) acc += w[k] * x[k];
      a.out[(m0 + j) * a.N + n0 + i] = acc + (a.bias ? a.bias[n0 + i] : 0.0f);
    }
  }
}

#ifdef HF_X86
__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 h = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)));
}

// The same block with AVX2: two weight rows (kN) times up to four x rows (kM), 8 lanes, the K tail in scalar.
template <int kN, int kM>
__attribute__((target("avx2,fma"))) void block_avx2(const Args& a, int64_t n0, int64_t m0) {
  __m256 acc[kN][kM];
  for (int i = 0; i < kN; ++i)
    for (int j = 0; j < kM; ++j) acc[i][j] = _mm256_setzero_ps();
  const float* w[kN];
  const float* x[kM];
  for (int i = 0; i < kN; ++i) w[i] = a.w + (n0 + i) * a.ldw;
  for (int j = 0; j < kM; ++j) x[j] = a.x + (m0 + j) * a.ldx;
  const int64_t K8 = a.K / 8 * 8;
  for (int64_t k = 0; k < K8; k += 8) {
    __m256 wv[kN];
    for (int i = 0; i < kN; ++i) wv[i] = _mm256_loadu_ps(w[i] + k);
    for (int j = 0; j < kM; ++j) {
      const __m256 xv = _mm256_loadu_ps(x[j] + k);
      for (int i = 0; i < kN; ++i) acc[i][j] = _mm256_fmadd_ps(wv[i], xv, acc[i][j]);
    }
  }
  for (int i = 0; i < kN; ++i) {
    for (int j = 0; j < kM; ++j) {
      float s = hsum(acc[i][j]);
      for (int64_t k = K8; k < a.K; ++k) s += w[i][k] * x[j][k];
      a.out[(m0 + j) * a.N + n0 + i] = s + (a.bias ? a.bias[n0 + i] : 0.0f);
    }
  }
}

template <int kN>
void block_avx2_rows(const Args& a, int64_t n0, int64_t m0, int64_t mm) {
  switch (mm) {
    case 1: return block_avx2<kN, 1>(a, n0, m0);
    case 2: return block_avx2<kN, 2>(a, n0, m0);
    case 3: return block_avx2<kN, 3>(a, n0, m0);
    default: return block_avx2<kN, 4>(a, n0, m0);
  }
}

bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}
#endif

void run(const Args& a) {
#ifdef HF_X86
  const bool avx2 = has_avx2();
#endif
  // Tasks of 64 weight rows: enough work per task, and N / 64 tasks to spread over the threads.
  at::parallel_for(0, (a.N + 1) / 2, 32, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t n0 = 2 * p, nn = std::min<int64_t>(2, a.N - n0);
      for (int64_t m0 = 0; m0 < a.M; m0 += 4) {
        const int64_t mm = std::min<int64_t>(4, a.M - m0);
#ifdef HF_X86
        if (avx2) {
          nn == 2 ? block_avx2_rows<2>(a, n0, m0, mm) : block_avx2_rows<1>(a, n0, m0, mm);
          continue;
        }
#endif
        block_scalar(a, n0, nn, m0, mm);
      }
    }
  });
}

}  // namespace

bool few_rows_fits(const at::Tensor& x, int64_t rows, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  return x.device().is_cpu() && x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat &&
         rows >= 2 && rows <= kFewRowsMax && x.size(-1) >= 1 && (x.size(-1) == 1 || x.stride(-1) == 1) &&
         weight.stride(-1) == 1 && (!bias || (bias->scalar_type() == at::kFloat && bias->is_contiguous()));
}

at::Tensor few_rows_linear(const at::Tensor& x, int64_t rows, int64_t row_stride, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias) {
  const int64_t N = weight.size(0), K = weight.size(1);
  at::Tensor out = at::empty({rows, N}, x.options());
  if (N == 0) return out;
  Args a{x.const_data_ptr<float>(), row_stride, rows, weight.const_data_ptr<float>(), weight.stride(0), K,
         bias ? bias->const_data_ptr<float>() : nullptr, out.mutable_data_ptr<float>(), N};
  run(a);
  return out;
}

}  // namespace hydra_fast::cpu

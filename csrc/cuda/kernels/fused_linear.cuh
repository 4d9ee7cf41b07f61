// The fused linear ops for a few rows (linear, rms_norm_linear, add_rms_norm_linear, silu_mul_linear): a
// weight-streaming GEMV whose prologue is the decoder layer's elementwise step before the projection.
//
// Every CTA first builds the M (<= kFlMaxRows) input rows of the product in shared memory, in the dtype T and
// with the rounding of reference.py (layer_math.cuh): a copy (linear), the RMSNorm of x (rms_norm_linear), of
// x + residual rounded to T (add_rms_norm_linear: CTA 0 also writes that sum out, the new residual stream) or
// silu(gate) * up (silu_mul_linear). Each CTA recomputes the prologue for itself, which costs a few KB of L2
// reads per CTA and saves a launch and a round trip through global memory. Then each warp takes one weight row
// at a time (grid-stride over the N output features), streams it in 16-byte vectors (kFlUnroll in flight per
// lane, not kept in L1), and reduces its M fp32 dot products with shuffles; lane 0 adds the bias in fp32 and
// rounds once to T. The dot products are summed in a different order than cuBLAS's GEMM, so results agree to
// fp32 rounding, not bit for bit.
#pragma once

#include <algorithm>

#include "layer_math.cuh"

namespace hydra_fast::kernels {

enum class Prologue : int { kNone = 0, kRms = 1, kAddRms = 2, kSiluMul = 3 };

struct FusedLinearParams {
  const void* x;            // [M, K] (kSiluMul: [M, 2K], gate | up), row stride x_stride, last dim contiguous
  const void* residual;     // [M, K] like x (kAddRms only)
  const void* norm_weight;  // [K] (kRms, kAddRms)
  const void* weight;       // [N, K], row stride w_stride, last dim contiguous
  const void* bias;         // [N] or null
  void* out;                // [M, N] contiguous
  void* sum;                // [M, K] contiguous: x + residual (kAddRms only)
  int64_t x_stride, residual_stride, w_stride;
  int M, N, K;
  float eps;
};

constexpr int kFlThreads = 128;
constexpr int kFlWarps = kFlThreads / 32;
constexpr int kFlMaxRows = 8;
constexpr int kFlUnroll = 4;
constexpr int kFlMaxSmem = 48 * 1024;  // the M x K input rows in T (no opt-in to larger shared memory needed)
constexpr int kFlCtasPerSm = 8;        // grid cap: CTAs beyond this many waves only repeat the prologue

// 16 bytes of a weight row that is read once: the read-only path, not allocated in L1.
template <typename T, int kN>
__device__ __forceinline__ Vec<T, kN> load_stream(const T* p) {
  static_assert(sizeof(Vec<T, kN>) == 16, "16-byte vectors only");
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
      : "l"(p));
  Vec<T, kN> v;
  *reinterpret_cast<uint4*>(&v) = r;
  return v;
}

// The M input rows of the product, built in shared memory xs [M, K] (values of T).
template <typename T, Prologue P>
__device__ __forceinline__ void fused_linear_prologue(const FusedLinearParams& p, T* xs) {
  constexpr int kVec = 16 / sizeof(T);
  using V = Vec<T, kVec>;
  const int nvec = p.K / kVec;
  __shared__ float warp_sums[kFlWarps];
  for (int m = 0; m < p.M; ++m) {
    const T* x = static_cast<const T*>(p.x) + m * p.x_stride;
    T* row = xs + m * p.K;
    if constexpr (P == Prologue::kNone) {
      for (int j = threadIdx.x; j < nvec; j += kFlThreads) {
        *reinterpret_cast<V*>(row + j * kVec) = load_raw<T, kVec>(x + j * kVec);
      }
    } else if constexpr (P == Prologue::kSiluMul) {
      for (int j = threadIdx.x; j < nvec; j += kFlThreads) {
        const V g = load_raw<T, kVec>(x + j * kVec), u = load_raw<T, kVec>(x + p.K + j * kVec);
        float y[kVec];
#pragma unroll
        for (int i = 0; i < kVec; ++i) y[i] = silu_mul_value<T>(to_float(g.v[i]), to_float(u.v[i]));
        store_vec<T, kVec>(row + j * kVec, y);
      }
    } else {
      float ss = 0.0f;
      for (int j = threadIdx.x; j < nvec; j += kFlThreads) {
        V v = load_raw<T, kVec>(x + j * kVec);
        if constexpr (P == Prologue::kAddRms) {
          const V r = load_raw<T, kVec>(static_cast<const T*>(p.residual) + m * p.residual_stride + j * kVec);
#pragma unroll
          for (int i = 0; i < kVec; ++i) v.v[i] = from_float<T>(__fadd_rn(to_float(v.v[i]), to_float(r.v[i])));
          if (blockIdx.x == 0) *reinterpret_cast<V*>(static_cast<T*>(p.sum) + m * p.K + j * kVec) = v;
        }
#pragma unroll
        for (int i = 0; i < kVec; ++i) ss = fmaf(to_float(v.v[i]), to_float(v.v[i]), ss);
        *reinterpret_cast<V*>(row + j * kVec) = v;
      }
      ss = warp_sum(ss);
      if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = ss;
      __syncthreads();
      float total = 0.0f;
#pragma unroll
      for (int w = 0; w < kFlWarps; ++w) total += warp_sums[w];  // the same order in every thread
      __syncthreads();  // warp_sums is reused by the next row
      const float rinv = rms_inv_from_sum(total, p.K, p.eps);
      const T* nw = static_cast<const T*>(p.norm_weight);
      for (int j = threadIdx.x; j < nvec; j += kFlThreads) {  // the elements this thread wrote above
        const V v = *reinterpret_cast<const V*>(row + j * kVec);
        const V w = load_raw<T, kVec>(nw + j * kVec);
        float y[kVec];
#pragma unroll
        for (int i = 0; i < kVec; ++i) y[i] = rms_scale<T>(to_float(v.v[i]), rinv, to_float(w.v[i]));
        store_vec<T, kVec>(row + j * kVec, y);
      }
    }
  }
  __syncthreads();
}

template <typename T, Prologue P, int kRows, bool kBias>
__global__ void __launch_bounds__(kFlThreads) fused_linear_kernel(const FusedLinearParams p) {
  constexpr int kVec = 16 / sizeof(T);
  using V = Vec<T, kVec>;
  extern __shared__ __align__(16) unsigned char fl_smem[];
  T* xs = reinterpret_cast<T*>(fl_smem);
  fused_linear_prologue<T, P>(p, xs);

  const int nvec = p.K / kVec;
  const int lane = threadIdx.x % 32;
  const int warps = gridDim.x * kFlWarps;
  for (int n = blockIdx.x * kFlWarps + threadIdx.x / 32; n < p.N; n += warps) {
    const T* w = static_cast<const T*>(p.weight) + static_cast<int64_t>(n) * p.w_stride;
    float acc[kRows];
#pragma unroll
    for (int m = 0; m < kRows; ++m) acc[m] = 0.0f;
    for (int j0 = lane; j0 < nvec; j0 += 32 * kFlUnroll) {
      V wv[kFlUnroll];
#pragma unroll
      for (int u = 0; u < kFlUnroll; ++u) {
        if (j0 + 32 * u < nvec) wv[u] = load_stream<T, kVec>(w + (j0 + 32 * u) * kVec);
      }
#pragma unroll
      for (int u = 0; u < kFlUnroll; ++u) {
        const int j = j0 + 32 * u;
        if (j < nvec) {
          float wf[kVec];
#pragma unroll
          for (int i = 0; i < kVec; ++i) wf[i] = to_float(wv[u].v[i]);
#pragma unroll
          for (int m = 0; m < kRows; ++m) {
            if (m < p.M) {
              const V xv = *reinterpret_cast<const V*>(xs + m * p.K + j * kVec);
#pragma unroll
              for (int i = 0; i < kVec; ++i) acc[m] = fmaf(wf[i], to_float(xv.v[i]), acc[m]);
            }
          }
        }
      }
    }
#pragma unroll
    for (int m = 0; m < kRows; ++m) acc[m] = warp_sum(acc[m]);
    if (lane == 0) {
      const float b = kBias ? to_float(static_cast<const T*>(p.bias)[n]) : 0.0f;
      T* out = static_cast<T*>(p.out);
#pragma unroll
      for (int m = 0; m < kRows; ++m) {
        if (m < p.M) out[static_cast<int64_t>(m) * p.N + n] = from_float<T>(kBias ? __fadd_rn(acc[m], b) : acc[m]);
      }
    }
  }
}

// Shared memory of the input rows, in bytes.
inline size_t fused_linear_smem(int M, int K, size_t elem) { return static_cast<size_t>(M) * K * elem; }

template <typename T, Prologue P, int kRows, bool kBias>
cudaError_t launch_fused_linear(const FusedLinearParams& p, int sms, cudaStream_t stream) {
  if (p.M == 0 || p.N == 0) return cudaSuccess;
  if (p.M > kRows || p.K % (16 / static_cast<int>(sizeof(T))) != 0) return cudaErrorInvalidValue;
  const size_t smem = fused_linear_smem(p.M, p.K, sizeof(T));
  if (smem > static_cast<size_t>(kFlMaxSmem)) return cudaErrorInvalidConfiguration;
  const int64_t want = ceil_div64(p.N, kFlWarps);
  const int ctas = static_cast<int>(std::min<int64_t>(want, static_cast<int64_t>(sms) * kFlCtasPerSm));
  fused_linear_kernel<T, P, kRows, kBias><<<ctas, kFlThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace hydra_fast::kernels

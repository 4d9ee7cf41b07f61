// The fused linear ops for a few rows (linear, rms_norm_linear, add_rms_norm_linear): a weight-streaming GEMV
// whose prologue is the decoder layer's elementwise step before the projection, and whose epilogue can be the
// MLP's SiLU-and-multiply.
//
// Every CTA first builds the M (<= kFlMaxRows) input rows of the product in shared memory, in the dtype T and
// with the rounding of reference.py (layer_math.cuh): a copy (linear), the RMSNorm of x (rms_norm_linear) or of
// x + residual rounded to T (add_rms_norm_linear: CTA 0 also writes that sum out, the new residual stream). Each
// CTA recomputes the prologue for itself, which costs a few KB of L2 reads per CTA and saves a launch and a round
// trip through global memory (with 4+ rows each warp builds its own rows, so they are built side by side). Then
// each warp takes one weight row at a time (grid-stride over the N output features; with the SiLU epilogue, the
// gate row n and the up row I + n together), streams it in 16-byte vectors (kFlUnroll in flight per lane; not kept
// in L1), and reduces its M fp32 dot products with shuffles; lane 0 adds the bias in fp32 and rounds once to T
// (then, with the epilogue, T(silu(gate)) * up). The grid is one wave of resident 4-warp CTAs. The dot products are
// summed in a different order than cuBLAS's GEMM, so results agree to fp32 rounding, not bit for bit.
#pragma once

#include <algorithm>

#include "layer_math.cuh"

namespace hydra_fast::kernels {

enum class Prologue : int { kNone = 0, kRms = 1, kAddRms = 2 };

struct FusedLinearParams {
  const void* x;            // [M, K], row stride x_stride, last dim contiguous
  const void* residual;     // [M, K] like x (kAddRms only)
  const void* norm_weight;  // [K] (kRms, kAddRms)
  const void* weight;       // [N, K], row stride w_stride, last dim contiguous
  const void* bias;         // [N] or null
  void* out;                // [M, N] contiguous ([M, N / 2] with the SiLU-and-multiply epilogue)
  void* sum;                // [M, K] contiguous: x + residual (kAddRms only)
  int64_t x_stride, residual_stride, w_stride;
  int M, N, K;
  float eps;
};

constexpr int kFlThreads = 128;  // 4 warps: many small CTAs keep more weight bytes in flight per SM than few big ones
constexpr int kFlWarps = kFlThreads / 32;
constexpr int kFlMaxRows = 8;
constexpr int kFlUnroll = 4;
constexpr int kFlMaxSmem = 48 * 1024;  // the M x K input rows in T (no opt-in to larger shared memory needed)

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

// One input row m of the product, built into shared memory row [K] (values of T) by `threads` threads of which
// this is thread `t`: the copy (kNone), or the RMSNorm of x or of T(x + residual) (CTA 0 also writes that sum out).
// Each thread takes vectors t, t + threads, ... kIn at a time, all loaded before any is used (the loads are what
// the prologue waits on). `reduce` sums a float over the `threads` threads, the same way in each.
template <typename T, Prologue P, int kIn, typename Reduce>
__device__ __forceinline__ void build_row(const FusedLinearParams& p, int m, T* row, int t, int threads,
                                          Reduce reduce) {
  constexpr int kVec = 16 / sizeof(T);
  using V = Vec<T, kVec>;
  const int nvec = p.K / kVec;
  const T* x = static_cast<const T*>(p.x) + m * p.x_stride;
  if constexpr (P == Prologue::kNone) {
    for (int j = t; j < nvec; j += threads) *reinterpret_cast<V*>(row + j * kVec) = load_raw<T, kVec>(x + j * kVec);
  } else {
    const T* res = static_cast<const T*>(p.residual) + m * p.residual_stride;
    float ss = 0.0f;
    for (int j = t; j < nvec; j += kIn * threads) {
      V v[kIn], r[kIn];
#pragma unroll
      for (int u = 0; u < kIn; ++u) {
        if (j + u * threads < nvec) v[u] = load_raw<T, kVec>(x + (j + u * threads) * kVec);
      }
      if constexpr (P == Prologue::kAddRms) {
#pragma unroll
        for (int u = 0; u < kIn; ++u) {
          if (j + u * threads < nvec) r[u] = load_raw<T, kVec>(res + (j + u * threads) * kVec);
        }
      }
#pragma unroll
      for (int u = 0; u < kIn; ++u) {
        const int ju = j + u * threads;
        if (ju < nvec) {
          if constexpr (P == Prologue::kAddRms) {
#pragma unroll
            for (int i = 0; i < kVec; ++i) {
              v[u].v[i] = from_float<T>(__fadd_rn(to_float(v[u].v[i]), to_float(r[u].v[i])));
            }
            if (blockIdx.x == 0) *reinterpret_cast<V*>(static_cast<T*>(p.sum) + m * p.K + ju * kVec) = v[u];
          }
#pragma unroll
          for (int i = 0; i < kVec; ++i) ss = fmaf(to_float(v[u].v[i]), to_float(v[u].v[i]), ss);
          *reinterpret_cast<V*>(row + ju * kVec) = v[u];
        }
      }
    }
    const float rinv = rms_inv_from_sum(reduce(ss), p.K, p.eps);
    const T* nw = static_cast<const T*>(p.norm_weight);
    for (int j = t; j < nvec; j += threads) {  // the elements this thread wrote above
      const V v = *reinterpret_cast<const V*>(row + j * kVec);
      const V w = load_raw<T, kVec>(nw + j * kVec);
      float y[kVec];
#pragma unroll
      for (int i = 0; i < kVec; ++i) y[i] = rms_scale<T>(to_float(v.v[i]), rinv, to_float(w.v[i]));
      store_vec<T, kVec>(row + j * kVec, y);
    }
  }
}

// The M input rows of the product, built in shared memory xs [M, K] (values of T). Fewer rows than warps: the
// whole CTA builds one row after another (its sum of squares reduced over the CTA); more: each warp builds rows
// w, w + warps, ... on its own (reduced over the warp), so the rows are built side by side, not in turn.
template <typename T, Prologue P>
__device__ __forceinline__ void fused_linear_prologue(const FusedLinearParams& p, T* xs) {
  __shared__ float warp_sums[kFlWarps];
  const int warps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (p.M < warps) {
    const auto block_sum = [&](float v) {
      v = warp_sum(v);
      if (lane == 0) warp_sums[warp] = v;
      __syncthreads();
      float total = 0.0f;
      for (int w = 0; w < warps; ++w) total += warp_sums[w];  // the same order in every thread
      __syncthreads();  // warp_sums is reused by the next row
      return total;
    };
    for (int m = 0; m < p.M; ++m) build_row<T, P, 2>(p, m, xs + m * p.K, threadIdx.x, blockDim.x, block_sum);
  } else {
    const auto lane_sum = [](float v) { return warp_sum(v); };
    for (int m = warp; m < p.M; m += warps) build_row<T, P, 2>(p, m, xs + m * p.K, lane, 32, lane_sum);
  }
  __syncthreads();
}

// Resident CTAs per SM the register budget must allow: one row at most 64 registers, so that 8 CTAs (32 warps)
// keep enough weight bytes in flight; 2-8 rows 6 CTAs (85 registers: their accumulators).
template <int kRows>
constexpr int fl_min_ctas() { return kRows == 1 ? 8 : 6; }

// kSiluOut: the weight is gate | up [2I, K] and each warp takes rows n and I + n together, so the output is
// T(silu(T(gate))) * T(up) [M, I] (silu_mul of the product, reference rounding) instead of the product [M, 2I].

template <typename T, Prologue P, int kRows, bool kBias, bool kSiluOut>
__global__ void __launch_bounds__(kFlThreads, fl_min_ctas<kRows>()) fused_linear_kernel(const FusedLinearParams p) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kR = kSiluOut ? 2 : 1;  // weight rows per warp item
  constexpr int kU = kFlUnroll / kR;     // vectors in flight per lane and row: kFlUnroll in all
  using V = Vec<T, kVec>;
  extern __shared__ __align__(16) unsigned char fl_smem[];
  T* xs = reinterpret_cast<T*>(fl_smem);
  const int nvec = p.K / kVec;
  const int lane = threadIdx.x % 32;
  const int cta_warps = blockDim.x / 32;
  const int warps = gridDim.x * cta_warps;
  const int first = blockIdx.x * cta_warps + threadIdx.x / 32;  // this warp's first item
  const int items = kSiluOut ? p.N / 2 : p.N;
  const int64_t pair = static_cast<int64_t>(items) * p.w_stride;  // gate row n -> up row I + n
  const T* weight = static_cast<const T*>(p.weight);

  // Start pulling this warp's first weight row(s) into L2 while the kernel before finishes and the prologue runs
  // (a prefetch is a hint, so it may come before the wait).
  if (first < items) {
    const char* w0 = reinterpret_cast<const char*>(weight + static_cast<int64_t>(first) * p.w_stride);
    const int bytes = p.K * static_cast<int>(sizeof(T));
#pragma unroll
    for (int r = 0; r < kR; ++r) {
      for (int off = lane * 128; off < bytes; off += 32 * 128) prefetch_l2(w0 + r * pair * sizeof(T) + off);
    }
  }
  pdl_wait();  // x, the residual and the output buffers belong to the kernels before
  pdl_launch_dependents();

  fused_linear_prologue<T, P>(p, xs);

  for (int n = first; n < items; n += warps) {
    const T* w = weight + static_cast<int64_t>(n) * p.w_stride;
    float acc[kR][kRows];
#pragma unroll
    for (int r = 0; r < kR; ++r) {
#pragma unroll
      for (int m = 0; m < kRows; ++m) acc[r][m] = 0.0f;
    }
    for (int j0 = lane; j0 < nvec; j0 += 32 * kU) {
      V wv[kR][kU];
#pragma unroll
      for (int r = 0; r < kR; ++r) {
#pragma unroll
        for (int u = 0; u < kU; ++u) {
          if (j0 + 32 * u < nvec) wv[r][u] = load_stream<T, kVec>(w + r * pair + (j0 + 32 * u) * kVec);
        }
      }
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int j = j0 + 32 * u;
        if (j < nvec) {
#pragma unroll
          for (int m = 0; m < kRows; ++m) {
            if (m < p.M) {
              const V xv = *reinterpret_cast<const V*>(xs + m * p.K + j * kVec);
#pragma unroll
              for (int r = 0; r < kR; ++r) {
#pragma unroll
                for (int i = 0; i < kVec; ++i) acc[r][m] = fmaf(to_float(wv[r][u].v[i]), to_float(xv.v[i]), acc[r][m]);
              }
            }
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kR; ++r) {
#pragma unroll
      for (int m = 0; m < kRows; ++m) acc[r][m] = warp_sum(acc[r][m]);
    }
    if (lane == 0) {
      const T* bias = static_cast<const T*>(p.bias);
      T* out = static_cast<T*>(p.out);
#pragma unroll
      for (int m = 0; m < kRows; ++m) {
        if (m < p.M) {
          float y[kR];  // the product's values, rounded to T
#pragma unroll
          for (int r = 0; r < kR; ++r) {
            y[r] = round_to<T>(kBias ? __fadd_rn(acc[r][m], to_float(bias[n + r * items])) : acc[r][m]);
          }
          const float v = kSiluOut ? silu_mul_value<T>(y[0], y[kR - 1]) : y[0];
          out[static_cast<int64_t>(m) * items + n] = from_float<T>(v);
        }
      }
    }
  }
}

// Shared memory of the input rows, in bytes.
inline size_t fused_linear_smem(int M, int K, size_t elem) { return static_cast<size_t>(M) * K * elem; }

template <typename T, Prologue P, int kRows, bool kBias, bool kSiluOut>
cudaError_t launch_fused_linear(const FusedLinearParams& p, int sms, cudaStream_t stream, bool pdl) {
  if (p.M == 0 || p.N == 0) return cudaSuccess;
  if (p.M > kRows || p.K % (16 / static_cast<int>(sizeof(T))) != 0 || (kSiluOut && p.N % 2 != 0)) {
    return cudaErrorInvalidValue;
  }
  const size_t smem = fused_linear_smem(p.M, p.K, sizeof(T));
  if (smem > static_cast<size_t>(kFlMaxSmem)) return cudaErrorInvalidConfiguration;
  const auto kernel = fused_linear_kernel<T, P, kRows, kBias, kSiluOut>;
  int per_sm = 0;  // resident CTAs per SM (registers, shared memory): the grid is at most one wave of them
  const cudaError_t err = occupancy_per_sm(reinterpret_cast<const void*>(kernel), kFlThreads, smem, &per_sm);
  if (err != cudaSuccess) return err;
  const int64_t items = kSiluOut ? p.N / 2 : p.N;
  const int64_t want = ceil_div64(items, kFlThreads / 32);
  const int ctas = static_cast<int>(std::min<int64_t>(want, static_cast<int64_t>(sms) * std::max(per_sm, 1)));
  return launch_kernel(kernel, dim3(ctas), dim3(kFlThreads), smem, stream, pdl, p);
}

}  // namespace hydra_fast::kernels

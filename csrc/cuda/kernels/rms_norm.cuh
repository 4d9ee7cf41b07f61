// rms_norm and add_rms_norm: one CTA per row of the last dim.
//
// Each thread holds up to kPer vectors of kVec values of its row in registers, packed in T (x, or x + residual
// rounded to T, which add_rms_norm also writes out), with the matching weights loaded up front; the fp32 sum of squares is
// reduced with warp shuffles and one shared-memory step, so global memory is read once. Rounding as
// reference.rms_norm (layer_math.cuh).
#pragma once

#include "layer_math.cuh"

namespace hydra_fast::kernels {

struct RmsNormParams {
  const void* x;         // [rows, d], row stride x_stride (elements), last dim contiguous
  const void* residual;  // [rows, d] like x, or null (rms_norm)
  const void* weight;    // [d]
  void* out;             // [rows, d] contiguous
  void* sum;             // [rows, d] contiguous: x + residual (add_rms_norm only)
  int64_t x_stride, residual_stride;
  int64_t rows;
  int d;
  float eps;
};

constexpr int kRmsMaxThreads = 1024;

template <typename T, int kVec, int kPer, bool kAdd>
__global__ void __launch_bounds__(kRmsMaxThreads) rms_norm_kernel(const RmsNormParams p) {
  const int64_t row = blockIdx.x;
  const int nvec = p.d / kVec;
  const T* x = static_cast<const T*>(p.x) + row * p.x_stride;
  const T* w = static_cast<const T*>(p.weight);
  Vec<T, kVec> v[kPer], wv[kPer];
  float ss = 0.0f;
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    const int j = threadIdx.x + k * blockDim.x;
    if (j < nvec) {
      v[k] = load_raw<T, kVec>(x + j * kVec);
      wv[k] = load_raw<T, kVec>(w + j * kVec);
      if constexpr (kAdd) {
        const Vec<T, kVec> r = load_raw<T, kVec>(static_cast<const T*>(p.residual) + row * p.residual_stride + j * kVec);
#pragma unroll
        for (int i = 0; i < kVec; ++i) v[k].v[i] = from_float<T>(__fadd_rn(to_float(v[k].v[i]), to_float(r.v[i])));
        *reinterpret_cast<Vec<T, kVec>*>(static_cast<T*>(p.sum) + row * p.d + j * kVec) = v[k];
      }
#pragma unroll
      for (int i = 0; i < kVec; ++i) ss = fmaf(to_float(v[k].v[i]), to_float(v[k].v[i]), ss);
    }
  }

  __shared__ float warp_sums[kRmsMaxThreads / 32];
  __shared__ float total;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  ss = warp_sum(ss);
  if (lane == 0) warp_sums[warp] = ss;
  __syncthreads();
  if (warp == 0) {
    float t = lane < static_cast<int>(blockDim.x / 32) ? warp_sums[lane] : 0.0f;
    t = warp_sum(t);
    if (lane == 0) total = t;
  }
  __syncthreads();
  const float r = rms_inv_from_sum(total, p.d, p.eps);

  T* out = static_cast<T*>(p.out) + row * p.d;
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    const int j = threadIdx.x + k * blockDim.x;
    if (j < nvec) {
      float y[kVec];
#pragma unroll
      for (int i = 0; i < kVec; ++i) y[i] = rms_scale<T>(to_float(v[k].v[i]), r, to_float(wv[k].v[i]));
      store_vec<T, kVec>(out + j * kVec, y);
    }
  }
}

// Threads per CTA for a row of nvec vectors held kPer per thread: a multiple of 32, at most kRmsMaxThreads.
inline int rms_norm_threads(int nvec, int per) {
  const int threads = (nvec + per - 1) / per;
  return ((threads + 31) / 32) * 32;
}

template <typename T, int kVec, int kPer, bool kAdd>
cudaError_t launch_rms_norm(const RmsNormParams& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  if (p.rows > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const int threads = rms_norm_threads(p.d / kVec, kPer);
  if (threads > kRmsMaxThreads) return cudaErrorInvalidConfiguration;
  rms_norm_kernel<T, kVec, kPer, kAdd><<<static_cast<unsigned>(p.rows), threads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace hydra_fast::kernels

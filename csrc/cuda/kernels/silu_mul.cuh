// silu_mul: out[r, i] = T(T(silu(x[r, i])) * x[r, I + i]) for x = gate | up [rows, 2I].
//
// Elementwise: each thread reads one vector of kVec gate values and the matching up values (16 bytes each when
// aligned) and writes one vector of the output. grid.y walks the rows (looping when there are more than 65535).
#pragma once

#include "layer_math.cuh"

namespace hydra_fast::kernels {

struct SiluMulParams {
  const void* x;  // [rows, 2I], row stride x_stride (elements), last dim contiguous
  void* out;      // [rows, I] contiguous
  int64_t x_stride;
  int64_t rows, I;
};

constexpr int kSiluThreads = 256;

template <typename T, int kVec>
__global__ void __launch_bounds__(kSiluThreads) silu_mul_kernel(const SiluMulParams p) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;  // vector index in the row
  if (j * kVec >= p.I) return;
  for (int64_t row = blockIdx.y; row < p.rows; row += gridDim.y) {
    const T* gate = static_cast<const T*>(p.x) + row * p.x_stride + j * kVec;
    float g[kVec], u[kVec];
    load_vec<T, kVec>(gate, g);
    load_vec<T, kVec>(gate + p.I, u);
#pragma unroll
    for (int i = 0; i < kVec; ++i) g[i] = silu_mul_value<T>(g[i], u[i]);
    store_vec<T, kVec>(static_cast<T*>(p.out) + row * p.I + j * kVec, g);
  }
}

template <typename T, int kVec>
cudaError_t launch_silu_mul(const SiluMulParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.I == 0) return cudaSuccess;
  const int64_t blocks_x = ceil_div64(p.I / kVec, kSiluThreads);
  if (blocks_x > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>(p.rows < 65535 ? p.rows : 65535));
  silu_mul_kernel<T, kVec><<<grid, kSiluThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace hydra_fast::kernels

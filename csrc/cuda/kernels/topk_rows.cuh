// topk_rows: each row's k largest values (k <= kK) and their indices, by value descending, ties to the lower
// index, NaN above every number and NaNs among themselves by index (reference.topk_rows).
//
// One CTA per row. Every element becomes one unique 64-bit key whose unsigned order is the output order: the
// high word is the fp32 value mapped to an order-preserving unsigned integer (-0.0 as +0.0, every NaN the
// largest), the low word ~index (the lower index wins a tie). Each thread keeps the kK largest keys of its
// strided elements, sorted, in registers; each warp then takes its k largest by k rounds of a warp-wide max over
// its threads' heads; warp 0 merges the warps' sorted lists the same way and writes the k winners, reading
// their values back from the row (so -0.0 and NaN payloads come out as they went in). Key 0 marks an empty slot:
// a real key's high word is at least that of -inf, 0x007fffff.
#pragma once

#include <type_traits>

#include "common.cuh"

namespace hydra_fast::kernels {

struct TopkRowsParams {
  const void* x;     // [rows, V], row stride x_stride (elements), last dim contiguous
  void* values;      // [rows, k] contiguous, x's dtype
  int64_t* indices;  // [rows, k] contiguous
  int64_t x_stride;
  int64_t rows;
  int V, k;  // 1 <= k <= kK, V < 2^31
};

constexpr int kTopkMaxThreads = 512;
constexpr int kTopkMaxWarps = kTopkMaxThreads / 32;

__device__ __forceinline__ uint64_t topk_key(float v, int index) {
  uint32_t b = __float_as_uint(v);
  if ((b << 1) == 0) b = 0;  // -0.0 ranks as +0.0
  const uint32_t ordered = is_nan(v) ? 0xffffffffu : ((b & 0x80000000u) ? ~b : (b | 0x80000000u));
  return (static_cast<uint64_t>(ordered) << 32) | static_cast<uint32_t>(~static_cast<uint32_t>(index));
}
__device__ __forceinline__ int topk_key_index(uint64_t key) { return static_cast<int>(~static_cast<uint32_t>(key)); }

// Insert key into the descending list (all in registers: every index is a compile-time constant after unrolling).
template <int kK>
__device__ __forceinline__ void topk_insert(uint64_t (&list)[kK], uint64_t key) {
  if (key <= list[kK - 1]) return;
#pragma unroll
  for (int j = kK - 1; j >= 0; --j) {
    const uint64_t above = j > 0 ? list[j - 1] : ~uint64_t{0};
    if (key > above) {
      list[j] = above;
    } else if (key > list[j]) {
      list[j] = key;
    }
  }
}

template <int kK>
__device__ __forceinline__ void topk_pop(uint64_t (&list)[kK]) {
#pragma unroll
  for (int j = 0; j + 1 < kK; ++j) list[j] = list[j + 1];
  list[kK - 1] = 0;
}

__device__ __forceinline__ uint64_t warp_max_u64(uint64_t x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const uint64_t y = __shfl_xor_sync(0xffffffffu, x, o);
    x = y > x ? y : x;
  }
  return x;
}

// kVec elements of a row as they are stored: one T, or one 16-byte vector (unpacked only when used, so that a
// thread's kTopkBatch loads in flight cost 4 registers each).
template <typename T, int kVec>
struct TopkChunk {
  using Raw = std::conditional_t<kVec == 1, T, uint4>;
  Raw raw;
  __device__ __forceinline__ void load(const T* p) {
    if constexpr (kVec == 1) {
      raw = p[0];
    } else {
      raw = ld_stream_u4(p);
    }
  }
  __device__ __forceinline__ void unpack(float* out) const {
    if constexpr (kVec == 1) {
      out[0] = to_float(raw);
    } else {
      unpack16<T>(raw, out);
    }
  }
};

// Loads each thread keeps in flight before it ranks their elements: the row is read in few round trips.
constexpr int kTopkBatch = 4;

template <typename T, int kK, int kVec>
__global__ void __launch_bounds__(kTopkMaxThreads) topk_rows_kernel(const TopkRowsParams p) {
  __shared__ uint64_t warp_lists[kTopkMaxWarps][kK];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  pdl_wait();  // the logits come from the kernels before
  pdl_launch_dependents();
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const T* x = static_cast<const T*>(p.x) + row * p.x_stride;
    uint64_t list[kK];
#pragma unroll
    for (int j = 0; j < kK; ++j) list[j] = 0;
    const int chunks = p.V / kVec;
    for (int c0 = threadIdx.x; c0 < chunks; c0 += kTopkBatch * blockDim.x) {
      TopkChunk<T, kVec> batch[kTopkBatch];
#pragma unroll
      for (int u = 0; u < kTopkBatch; ++u) {
        const int c = c0 + u * blockDim.x;
        if (c < chunks) batch[u].load(x + c * kVec);
      }
#pragma unroll
      for (int u = 0; u < kTopkBatch; ++u) {
        const int c = c0 + u * blockDim.x;
        if (c < chunks) {
          float f[kVec];
          batch[u].unpack(f);
#pragma unroll
          for (int e = 0; e < kVec; ++e) topk_insert<kK>(list, topk_key(f[e], c * kVec + e));
        }
      }
    }
    // Each warp's k best, in order, to shared memory.
    for (int r = 0; r < p.k; ++r) {
      const uint64_t best = warp_max_u64(list[0]);
      if (list[0] == best) topk_pop<kK>(list);  // keys are unique: one lane (or only empty slots) matches
      if (lane == 0) warp_lists[warp][r] = best;
    }
    __syncthreads();
    if (warp == 0) {
      int taken = 0;  // lane w < warps walks warp w's list
      uint64_t head = lane < warps ? warp_lists[lane][0] : 0;
      for (int r = 0; r < p.k; ++r) {
        const uint64_t best = warp_max_u64(head);
        if (head == best && lane < warps) {
          const int index = topk_key_index(best);
          static_cast<T*>(p.values)[row * p.k + r] = x[index];
          p.indices[row * p.k + r] = index;
          ++taken;
          head = taken < p.k ? warp_lists[lane][taken] : 0;
        }
      }
    }
    __syncthreads();  // warp_lists is refilled for the next row
  }
}

template <typename T, int kK, int kVec>
cudaError_t launch_topk_rows(const TopkRowsParams& p, cudaStream_t stream, bool pdl) {
  if (p.rows == 0) return cudaSuccess;
  // Enough threads that each reads its part of the row in about one batch of loads (up to 512 threads).
  int threads = 128;
  while (threads < kTopkMaxThreads && p.V > threads * kTopkBatch * kVec) threads *= 2;
  const unsigned grid = static_cast<unsigned>(p.rows < (int64_t{1} << 30) ? p.rows : (int64_t{1} << 30));
  return launch_kernel(topk_rows_kernel<T, kK, kVec>, dim3(grid), dim3(threads), 0, stream, pdl, p);
}

}  // namespace hydra_fast::kernels

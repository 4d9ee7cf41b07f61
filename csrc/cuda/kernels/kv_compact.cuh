// KV compaction after acceptance, in place, all layers and both caches in one launch.
//
// Each thread owns one vector (VecT, up to 16 bytes) of one (cache, layer, b, kv head) row: the same column of
// every slot. For its sequence it moves slot len + accepted_nodes[b, j] to len + j for each valid j (node >= 0,
// source != destination), slots clamped into [0, S) as the reference clamps them. It first loads up to
// kMaxJ sources into registers, then stores them: the reference's "gather everything, then scatter" order,
// exact whenever Lp <= kMaxJ. For longer lists the chunks of kMaxJ run one after the other, which is still
// exact for tree paths (node_j >= j, strictly increasing, so no later source is an earlier destination).
// No thread touches another thread's bytes, so there are no inter-thread hazards.
#pragma once

#include "common.cuh"

namespace hydra_fast::kernels {

struct KvCompactParams {
  char* base[2];             // k_cache, v_cache
  int64_t stride[2][4];      // bytes: layer, b, head, slot (the last dim is contiguous)
  int64_t L, B, H, S;
  int64_t row_vecs;          // vectors per slot row: D * elem_size / sizeof(VecT)
  const int32_t* lens;       // [B]
  int64_t lens_stride;
  const int64_t* nodes;      // [B, Lp], -1 padded
  int64_t nodes_s0, nodes_s1;
  int Lp;
};

template <typename VecT, int kMaxJ>
__global__ void __launch_bounds__(256) kv_compact_kernel(const KvCompactParams p) {
  const int64_t total = 2 * p.L * p.B * p.H * p.row_vecs;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= total) return;
  int64_t rest = idx;
  const int64_t vec = rest % p.row_vecs;
  rest /= p.row_vecs;
  const int64_t h = rest % p.H;
  rest /= p.H;
  const int64_t b = rest % p.B;
  rest /= p.B;
  const int64_t layer = rest % p.L;
  const int which = static_cast<int>(rest / p.L);

  const int64_t* st = p.stride[which];
  char* col = p.base[which] + layer * st[0] + b * st[1] + h * st[2] + vec * static_cast<int64_t>(sizeof(VecT));
  const int64_t slot_stride = st[3];
  const int64_t len = p.lens[b * p.lens_stride];
  const int64_t* nodes = p.nodes + b * p.nodes_s0;

  for (int j0 = 0; j0 < p.Lp; j0 += kMaxJ) {
    VecT buf[kMaxJ];
    int64_t dst[kMaxJ];
    bool active[kMaxJ];
#pragma unroll
    for (int jj = 0; jj < kMaxJ; ++jj) {
      const int j = j0 + jj;
      active[jj] = false;
      dst[jj] = 0;
      if (j < p.Lp) {
        const int64_t node = nodes[j * p.nodes_s1];
        if (node >= 0) {
          const int64_t src = min(max(len + node, int64_t(0)), p.S - 1);
          dst[jj] = min(max(len + j, int64_t(0)), p.S - 1);
          active[jj] = src != dst[jj];
          if (active[jj]) buf[jj] = *reinterpret_cast<const VecT*>(col + src * slot_stride);
        }
      }
    }
#pragma unroll
    for (int jj = 0; jj < kMaxJ; ++jj) {
      if (active[jj]) *reinterpret_cast<VecT*>(col + dst[jj] * slot_stride) = buf[jj];
    }
  }
}

template <typename VecT, int kMaxJ>
cudaError_t launch_kv_compact(const KvCompactParams& p, cudaStream_t stream) {
  const int64_t total = 2 * p.L * p.B * p.H * p.row_vecs;
  if (total == 0 || p.Lp == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  const int64_t blocks = ceil_div64(total, kThreads);
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  kv_compact_kernel<VecT, kMaxJ><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace hydra_fast::kernels

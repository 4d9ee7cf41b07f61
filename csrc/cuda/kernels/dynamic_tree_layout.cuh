// The dynamic draft tree's layout (reference.dynamic_tree_layout) in one launch: one thread block per sequence.
//
//   1. selection: a block-wide bitonic sort of one 64-bit key per candidate in shared memory (the score's bits
//      mapped to an unsigned order and inverted, then the candidate index: ascending keys are descending
//      scores, ties to the lower index); the first `nodes` keys are the kept set;
//   2. numbering: a block scan over kept flags in candidate order gives each kept candidate its node index;
//   3. one thread per node: parent node and depth, the path by walking parents, the node's ancestor bitmap
//      (its mask row), and its bit in its parent's children bitmap;
//   4. child lists from the children bitmaps (the next set bit), and the mask written from the ancestor bitmaps
//      in vectors of kVec bytes.
// Shared memory: the sort keys (later the children bitmaps), the ancestor bitmaps and a few per-node arrays,
// sized by layout_smem(); at the limits (C <= kMaxCandidates, N <= kMaxNodes) about 140 KB.
// No global memory besides the inputs and outputs, no host reads: safe inside a CUDA graph.
#pragma once

#include "common.cuh"

namespace hydra_fast::kernels {

inline constexpr int kLayoutMaxCandidates = 8192;
inline constexpr int kLayoutMaxNodes = 512;

struct DynamicTreeLayoutParams {
  const float* score;  // [B, C]
  int64_t score_s0, score_s1;
  const int64_t* parent;  // [B, C]
  int64_t parent_s0, parent_s1;
  const int64_t* candidate_depth;  // [C]
  int64_t depth_s0;
  int64_t* kept;          // [B, nodes]
  int64_t* paths;         // [B, N, L]
  uint8_t* tree_mask;     // bool [B, N, N]
  int64_t* depth;         // [B, N]
  int64_t* first_child;   // [B, N]
  int64_t* next_sibling;  // [B, N]
  int B, C, nodes, M, L;  // N = 1 + nodes + M
};

__host__ __device__ inline int next_pow2(int x) {
  int p = 1;
  while (p < x) p <<= 1;
  return p;
}

// Byte offsets into the dynamic shared memory; the 8-byte arrays first.
struct LayoutSmem {
  int keys;   // uint64 [sort_len] during the selection, then uint32 [N][W] children bitmaps
  int depth;  // int64 [N]
  int anc;    // uint32 [N][W] ancestor bitmaps (mask rows)
  int slot;   // int32 [C] candidate -> node index (0: not kept)
  int kept;   // int32 [nodes]
  int par;    // int32 [N]
  int scan;   // int32 [32] per-warp totals
  int total;
};

__host__ __device__ inline LayoutSmem layout_smem(int C, int nodes, int N) {
  const int words = N * ceil_div(N, 32);
  const int key_bytes = 8 * next_pow2(C), bitmap_bytes = 4 * words;
  LayoutSmem s{};
  s.keys = 0;
  s.depth = s.keys + 8 * ceil_div(key_bytes > bitmap_bytes ? key_bytes : bitmap_bytes, 8);
  s.anc = s.depth + 8 * N;
  s.slot = s.anc + bitmap_bytes;
  s.kept = s.slot + 4 * C;
  s.par = s.kept + 4 * nodes;
  s.scan = s.par + 4 * N;
  s.total = s.scan + 4 * 32;
  return s;
}

// Threads per block: enough for one per node and one per pair of sort keys, a multiple of 32, <= 1024.
__host__ __device__ inline int layout_threads(int C, int N) {
  const int want = next_pow2(next_pow2(C) / 2 > N ? next_pow2(C) / 2 : N);
  return want < 64 ? 64 : (want > 1024 ? 1024 : want);
}

// The selection order as one key, smaller first (csrc/cpu/dynamic_tree_layout.cpp builds the same key): NaN
// above +inf and -0.0 equal to +0.0, as torch.sort orders them; ties to the lower candidate index.
__device__ __forceinline__ uint64_t rank_key(float score, int c) {
  uint32_t u = __float_as_uint(score);
  uint32_t ord;
  if (is_nan(score)) {
    ord = 0xffffffffu;
  } else {
    if (u == 0x80000000u) u = 0;
    ord = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  }
  return (static_cast<uint64_t>(~ord) << 32) | static_cast<uint32_t>(c);
}

// The lowest set bit at or after `from` in a bitmap row of `words` words, or -1.
__device__ __forceinline__ int next_set_bit(const uint32_t* row, int words, int from) {
  for (int w = from >> 5; w < words; ++w) {
    const uint32_t bits = row[w] & (w == (from >> 5) ? (~0u << (from & 31)) : ~0u);
    if (bits) return (w << 5) + __ffs(bits) - 1;
  }
  return -1;
}

// 4 bits -> 4 bytes of 0 / 1 (byte k = bit k).
__device__ __forceinline__ uint32_t spread4(uint32_t bits) { return (bits * 0x00204081u) & 0x01010101u; }

template <int kVec>
__device__ __forceinline__ void store_mask_bits(uint8_t* dst, uint32_t bits) {
  if constexpr (kVec == 16) {
    *reinterpret_cast<uint4*>(dst) =
        make_uint4(spread4(bits & 0xf), spread4((bits >> 4) & 0xf), spread4((bits >> 8) & 0xf), spread4(bits >> 12));
  } else if constexpr (kVec == 8) {
    *reinterpret_cast<uint2*>(dst) = make_uint2(spread4(bits & 0xf), spread4(bits >> 4));
  } else if constexpr (kVec == 4) {
    *reinterpret_cast<uint32_t*>(dst) = spread4(bits);
  } else {
    *dst = static_cast<uint8_t>(bits);
  }
}

// Inclusive prefix sum over the block (blockDim.x a multiple of 32, at most 1024); `warp_totals` [32] in smem.
__device__ __forceinline__ int block_inclusive_scan(int x, int* warp_totals) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) warp_totals[warp] = x;
  __syncthreads();
  if (warp == 0) {
    int t = lane < warps ? warp_totals[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, t, o);
      if (lane >= o) t += y;
    }
    if (lane < warps) warp_totals[lane] = t;
  }
  __syncthreads();
  return x + (warp > 0 ? warp_totals[warp - 1] : 0);
}

template <int kVec>
__global__ void __launch_bounds__(1024) dynamic_tree_layout_kernel(const DynamicTreeLayoutParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int C = p.C, nodes = p.nodes, Nh = 1 + nodes, N = Nh + p.M, L = p.L, W = ceil_div(N, 32);
  const LayoutSmem lay = layout_smem(C, nodes, N);
  uint64_t* keys = reinterpret_cast<uint64_t*>(smem + lay.keys);
  uint32_t* children = reinterpret_cast<uint32_t*>(smem + lay.keys);  // after the selection
  int64_t* depth = reinterpret_cast<int64_t*>(smem + lay.depth);
  uint32_t* anc = reinterpret_cast<uint32_t*>(smem + lay.anc);
  int* slot = reinterpret_cast<int*>(smem + lay.slot);
  int* kept = reinterpret_cast<int*>(smem + lay.kept);
  int* par = reinterpret_cast<int*>(smem + lay.par);
  int* scan = reinterpret_cast<int*>(smem + lay.scan);
  const int tid = threadIdx.x, T = blockDim.x;
  const int64_t b = blockIdx.x;

  // 1. sort the keys ascending (padding keys ~0 sort last)
  const int sort_len = next_pow2(C);
  const float* score = p.score + b * p.score_s0;
  for (int c = tid; c < sort_len; c += T) keys[c] = c < C ? rank_key(score[c * p.score_s1], c) : ~0ull;
  for (int c = tid; c < C; c += T) slot[c] = 0;
  __syncthreads();
  for (int k = 2; k <= sort_len; k <<= 1) {
    for (int j = k >> 1; j > 0; j >>= 1) {
      for (int i = tid; i < sort_len / 2; i += T) {
        const int lo = 2 * i - (i & (j - 1)), hi = lo + j;
        const uint64_t x = keys[lo], y = keys[hi];
        if ((x > y) == ((lo & k) == 0)) {
          keys[lo] = y;
          keys[hi] = x;
        }
      }
      __syncthreads();
    }
  }
  for (int r = tid; r < nodes; r += T) slot[static_cast<uint32_t>(keys[r])] = 1;
  __syncthreads();

  // 2. node index of each kept candidate: its rank among the kept in candidate order, after the root
  const int per = ceil_div(C, T), begin = min(C, tid * per), end = min(C, begin + per);
  int count = 0;
  for (int c = begin; c < end; ++c) count += slot[c];
  int node = block_inclusive_scan(count, scan) - count;
  int64_t* kept_out = p.kept + b * nodes;
  for (int c = begin; c < end; ++c) {
    if (slot[c]) {
      kept[node] = c;
      kept_out[node] = c;
      slot[c] = ++node;
    }
  }
  for (int w = tid; w < N * W; w += T) {  // the keys are dead: clear the children and ancestor bitmaps
    children[w] = 0;
    anc[w] = 0;
  }
  __syncthreads();

  // 3. parents and depths: root, kept candidates, context chain
  const int64_t* parent = p.parent + b * p.parent_s0;
  int64_t* depth_out = p.depth + b * N;
  for (int n = tid; n < N; n += T) {
    int pn;
    int64_t d;
    if (n == 0) {
      pn = -1;
      d = 0;
    } else if (n < Nh) {
      const int c = kept[n - 1];
      const int64_t up = parent[c * p.parent_s1];
      pn = (up < 0 || up >= C) ? 0 : slot[up];
      d = p.candidate_depth[c * p.depth_s0];
    } else {
      pn = n == Nh ? 0 : n - 1;
      d = n - Nh + 1;
    }
    par[n] = pn;
    depth[n] = d;
    depth_out[n] = d;
  }
  __syncthreads();

  // paths: column c is the depth-c ancestor (the (depth - c)-th, walked up from the node), -1 past the depth;
  // the ancestor bitmap row holds the same nodes, and the node sets its bit in its parent's children row
  int64_t* paths = p.paths + b * N * L;
  for (int n = tid; n < N; n += T) {
    if (par[n] >= 0) atomicOr(&children[par[n] * W + (n >> 5)], 1u << (n & 31));
    const int64_t d = depth[n];
    int cur = n, walked = 0;  // cur: the walked-th ancestor of n (-1 past the root)
    for (int c = L - 1; c >= 0; --c) {
      int out = -1;
      if (c <= d) {
        const int64_t want = d - c < L - 1 ? d - c : L - 1;
        while (walked < want) {
          cur = cur < 0 ? -1 : par[cur];
          ++walked;
        }
        out = cur;
      }
      paths[static_cast<int64_t>(n) * L + c] = out;
      if (out >= 0) anc[n * W + (out >> 5)] |= 1u << (out & 31);
    }
  }
  __syncthreads();

  // 4. child lists: the lowest child, the next child of the same parent
  int64_t* first_child = p.first_child + b * N;
  int64_t* next_sibling = p.next_sibling + b * N;
  for (int n = tid; n < N; n += T) {
    first_child[n] = next_set_bit(children + n * W, W, 0);
    next_sibling[n] = par[n] >= 0 && n + 1 < N ? next_set_bit(children + par[n] * W, W, n + 1) : -1;
  }
  // the mask from the ancestor bitmaps, kVec bytes (columns j0 .. j0 + kVec - 1 of one row, one word) at a time
  const int row_vecs = N / kVec;
  uint8_t* mask = p.tree_mask + b * N * N;
  for (int u = tid; u < N * row_vecs; u += T) {
    const int row = u / row_vecs, j0 = (u - row * row_vecs) * kVec;
    const uint32_t bits = (anc[row * W + (j0 >> 5)] >> (j0 & 31)) & ((1u << kVec) - 1);
    store_mask_bits<kVec>(mask + static_cast<int64_t>(row) * N + j0, bits);
  }
}

// kVec in {16, 8, 4, 1}: N % kVec == 0 and tree_mask aligned to kVec bytes (the glue picks it).
template <int kVec>
cudaError_t launch_dynamic_tree_layout(const DynamicTreeLayoutParams& p, cudaStream_t stream) {
  if (p.B == 0) return cudaSuccess;
  const int N = 1 + p.nodes + p.M;
  const int smem = layout_smem(p.C, p.nodes, N).total;
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(dynamic_tree_layout_kernel<kVec>,
                                                 cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
  }
  dynamic_tree_layout_kernel<kVec><<<p.B, layout_threads(p.C, N), smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace hydra_fast::kernels

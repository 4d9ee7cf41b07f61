// One block of a Hydra draft head for R rows: out = res(x) + silu(W x + b), with res(x) = Wr x + br for the
// first block's learned residual and res(x) = x otherwise. See reference.draft_head_mlp.
//
// The block input is read in place: x[r] = [xs[r] | embed[tok[r, 0]] | ... | embed[tok[r, k-1]]] (segment 0
// is hidden for the first block, the previous block's output after it), so the embedding gather and the
// concatenation never touch memory of their own. The bias, SiLU and residual are applied in the epilogue.
//
// mlp_block_mma_kernel (fp16/bf16, d % 32 == 0, 16-byte aligned rows): a weight-streaming GEMM for small R.
// A CTA of 8 warps owns 128 output features (16 per warp, the M side of mma.sync m16n8k16) for up to 64 rows
// (kNT n-tiles of 8, the N side) and one K split. W rows are streamed once from HBM with 16-byte loads that
// bypass L1, several slabs in flight; x rows come through L1 (all 8 warps read the same slabs). The K index
// is permuted identically in A and B (a thread's 8 consecutive elements feed two k16 steps), so every load is
// a plain 16-byte vector and no shuffles or shared memory are needed. With several K splits the CTAs write
// fp32 partial sums and the last CTA of each tile (a device-scope counter) adds them and runs the epilogue.
//
// Otherwise (R > 8, fp32, d % 32 != 0, unaligned rows) the glue gathers x once (mlp_gather_kernel), runs the
// GEMMs through cuBLAS (at::addmm, bias fused) and applies SiLU + residual in mlp_silu_residual_kernel:
// for R > 8 cuBLAS's tensor-core GEMMs beat this weight-streaming kernel on the H200.
#pragma once

#include <algorithm>

#include "common.cuh"

namespace hydra_fast::kernels {

struct MlpBlockParams {
  const void* x;  // segment 0 of the input rows: [R, d]
  int64_t xs0, xs1;
  const void* embed;  // [V, d], last dim contiguous (segments 1..k)
  int64_t es0;
  int64_t V;
  const int64_t* tokens;  // [R, k]
  int64_t ts0, ts1;
  int k;                  // token segments (0 after the first block)
  const void* w;          // [d, K]
  int64_t ws0, ws1;
  const void* bias;       // [d]
  int64_t bs;
  const void* wr;         // [d, K] or null
  int64_t wrs0, wrs1;
  const void* rbias;      // [d] or null
  int64_t rbs;
  void* out;              // [R, d] contiguous
  float* part;            // [2][ksplit][Rp][d] fp32 partial sums (ksplit > 1)
  int* counters;          // [feature tiles * row groups], zeroed (ksplit > 1)
  int R, d, K;
  int Rp;                 // R rounded up to whole row groups
  int ksplit, split_len;  // K per split (a multiple of 32)
};

__device__ __forceinline__ int64_t clamp_token(int64_t tok, int64_t V) {
  tok = tok < 0 ? tok + V : tok;  // Python indexing in the reference counts negative tokens from the end
  return min(max(tok, int64_t(0)), V - 1);
}

// Pointer to element `off` of segment `seg` of input row r.
template <typename T>
__device__ __forceinline__ const T* input_row(const MlpBlockParams& p, int r, int seg) {
  if (seg == 0) return static_cast<const T*>(p.x) + r * p.xs0;
  const int64_t tok = clamp_token(p.tokens[r * p.ts0 + (seg - 1) * p.ts1], p.V);
  return static_cast<const T*>(p.embed) + tok * p.es0;
}

// out[r, f] = res + silu(acc + bias[f]); res = acc_res + rbias[f] (learned residual) or x[r, f].
// Split in two so that callers issue every load of a batch of outputs before the first store (a store to
// `out` could alias the inputs as far as the compiler knows, which would serialise load, store, load...).
struct EpilogueIn {
  float bias, res;  // bias[f]; rbias[f] (learned residual) or x[r, f]
};

template <typename T, bool kHasRes>
__device__ __forceinline__ EpilogueIn mlp_epilogue_load(const MlpBlockParams& p, int r, int f) {
  EpilogueIn in;
  in.bias = to_float(static_cast<const T*>(p.bias)[f * p.bs]);
  if constexpr (kHasRes) {
    in.res = p.rbias != nullptr ? to_float(static_cast<const T*>(p.rbias)[f * p.rbs]) : 0.f;
  } else {
    in.res = to_float(static_cast<const T*>(p.x)[r * p.xs0 + f * p.xs1]);
  }
  return in;
}

template <typename T, bool kHasRes>
__device__ __forceinline__ void mlp_epilogue_store(const MlpBlockParams& p, int r, int f, const EpilogueIn& in,
                                                   float acc, float acc_res) {
  const float v = acc + in.bias;
  const float y = v / (1.f + __expf(-v));
  const float res = kHasRes ? acc_res + in.res : in.res;
  static_cast<T*>(p.out)[static_cast<int64_t>(r) * p.d + f] = from_float<T>(res + y);
}

// ================================================================ tensor-core path
constexpr int kMlpWarps = 8;
constexpr int kMlpFeatures = 16 * kMlpWarps;  // output features per CTA
constexpr int kMlpUnroll = 4;                 // 32-wide K slabs in flight per warp

template <typename T, int kNT, bool kHasRes>
__global__ void __launch_bounds__(kMlpWarps * 32, 1) mlp_block_mma_kernel(const MlpBlockParams p) {
  constexpr int kRG = 8 * kNT;  // rows per CTA
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int ftile = blockIdx.x, split = blockIdx.y, rgroup = blockIdx.z;
  pdl_wait();  // the rows and the split-K counters come from the kernels before
  pdl_launch_dependents();
  const int f0 = ftile * kMlpFeatures + warp * 16;  // this warp's first feature
  const int row0 = rgroup * kRG;
  const bool warp_active = f0 < p.d;  // d % 16 == 0: a warp's 16 features are all in range or all out

  float acc[kNT][4], accr[kNT][4];
#pragma unroll
  for (int j = 0; j < kNT; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[j][e] = accr[j][e] = 0.f;
  }

  const int kbeg = split * p.split_len;
  const int kend = min(kbeg + p.split_len, p.K);
  if (warp_active) {
    const T* wrow0 = static_cast<const T*>(p.w) + (f0 + g) * p.ws0 + 8 * t;
    const T* wrow1 = wrow0 + 8 * p.ws0;
    const T* rrow0 = nullptr;
    const T* rrow1 = nullptr;
    if constexpr (kHasRes) {
      rrow0 = static_cast<const T*>(p.wr) + (f0 + g) * p.wrs0 + 8 * t;
      rrow1 = rrow0 + 8 * p.wrs0;
    }
    for (int seg_start = (kbeg / p.d) * p.d; seg_start < kend; seg_start += p.d) {
      const int seg = seg_start / p.d;
      const T* xrow[kNT];
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
        const int r = row0 + j * 8 + g;
        xrow[j] = r < p.R ? input_row<T>(p, r, seg) + 8 * t : nullptr;  // indexed by k - seg_start
      }
      const int k_lo = max(kbeg, seg_start), k_hi = min(kend, seg_start + p.d);
      for (int k0 = k_lo; k0 < k_hi; k0 += 32 * kMlpUnroll) {
        uint4 wa[kMlpUnroll][2], ra[kMlpUnroll][2];
#pragma unroll
        for (int u = 0; u < kMlpUnroll; ++u) {
          const int kk = k0 + 32 * u;
          if (kk < k_hi) {
            wa[u][0] = ld_stream_u4(wrow0 + kk);
            wa[u][1] = ld_stream_u4(wrow1 + kk);
            if constexpr (kHasRes) {
              ra[u][0] = ld_stream_u4(rrow0 + kk);
              ra[u][1] = ld_stream_u4(rrow1 + kk);
            }
          }
        }
#pragma unroll
        for (int u = 0; u < kMlpUnroll; ++u) {
          const int kk = k0 + 32 * u;
          if (kk >= k_hi) break;
          uint4 xv[kNT];
#pragma unroll
          for (int j = 0; j < kNT; ++j) {
            xv[j] = xrow[j] != nullptr ? ld_cached_u4(xrow[j] + (kk - seg_start)) : make_uint4(0u, 0u, 0u, 0u);
          }
          // k step 0 takes elements 0-3 of each thread's 8, k step 1 elements 4-7 (same permutation in A and B).
          const uint32_t a0[4] = {wa[u][0].x, wa[u][1].x, wa[u][0].y, wa[u][1].y};
          const uint32_t a1[4] = {wa[u][0].z, wa[u][1].z, wa[u][0].w, wa[u][1].w};
#pragma unroll
          for (int j = 0; j < kNT; ++j) {
            mma_16816<T>(acc[j], a0, xv[j].x, xv[j].y);
            mma_16816<T>(acc[j], a1, xv[j].z, xv[j].w);
          }
          if constexpr (kHasRes) {
            const uint32_t r0[4] = {ra[u][0].x, ra[u][1].x, ra[u][0].y, ra[u][1].y};
            const uint32_t r1[4] = {ra[u][0].z, ra[u][1].z, ra[u][0].w, ra[u][1].w};
#pragma unroll
            for (int j = 0; j < kNT; ++j) {
              mma_16816<T>(accr[j], r0, xv[j].x, xv[j].y);
              mma_16816<T>(accr[j], r1, xv[j].z, xv[j].w);
            }
          }
        }
      }
    }
  }

  // acc[j][e]: feature f0 + g + 8 * (e >> 1), row row0 + 8 j + 2 t + (e & 1).
  if (p.ksplit == 1) {
    if (!warp_active) return;
    EpilogueIn in[kNT][4];
#pragma unroll
    for (int j = 0; j < kNT; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = row0 + j * 8 + 2 * t + (e & 1);
        if (r < p.R) in[j][e] = mlp_epilogue_load<T, kHasRes>(p, r, f0 + g + 8 * (e >> 1));
      }
    }
#pragma unroll
    for (int j = 0; j < kNT; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = row0 + j * 8 + 2 * t + (e & 1);
        if (r < p.R) mlp_epilogue_store<T, kHasRes>(p, r, f0 + g + 8 * (e >> 1), in[j][e], acc[j][e], accr[j][e]);
      }
    }
    return;
  }

  const int64_t part_stride = static_cast<int64_t>(p.ksplit) * p.Rp * p.d;  // W sums, then residual sums
  if (warp_active) {
    float* pw = p.part + static_cast<int64_t>(split) * p.Rp * p.d;
#pragma unroll
    for (int j = 0; j < kNT; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t idx = static_cast<int64_t>(row0 + j * 8 + 2 * t + (e & 1)) * p.d + f0 + g + 8 * (e >> 1);
        pw[idx] = acc[j][e];
        if constexpr (kHasRes) pw[part_stride + idx] = accr[j][e];
      }
    }
  }
  __shared__ int s_last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    const int prev = atomicAdd(p.counters + rgroup * gridDim.x + ftile, 1);
    s_last = prev == p.ksplit - 1;
  }
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  // The last CTA of the tile: sum the splits (L2 reads) and run the epilogue, features fastest, kBatch
  // outputs per thread with all their loads in flight before the first store.
  constexpr int kBatch = 4;
  const int nf = min(kMlpFeatures, p.d - ftile * kMlpFeatures);
  const int total = kRG * nf;
  for (int base = threadIdx.x; base < total; base += kMlpWarps * 32 * kBatch) {
    int rr[kBatch], ff[kBatch];
    bool ok[kBatch];
    float s[kBatch], sr[kBatch];
    EpilogueIn in[kBatch];
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      const int idx = base + j * kMlpWarps * 32;
      rr[j] = row0 + idx / nf;
      ff[j] = ftile * kMlpFeatures + idx % nf;
      ok[j] = idx < total && rr[j] < p.R;
      s[j] = sr[j] = 0.f;
      if (ok[j]) in[j] = mlp_epilogue_load<T, kHasRes>(p, rr[j], ff[j]);
    }
#pragma unroll 2
    for (int sp = 0; sp < p.ksplit; ++sp) {
#pragma unroll
      for (int j = 0; j < kBatch; ++j) {
        if (!ok[j]) continue;
        const int64_t off = (static_cast<int64_t>(sp) * p.Rp + rr[j]) * p.d + ff[j];
        s[j] += __ldcg(p.part + off);
        if constexpr (kHasRes) sr[j] += __ldcg(p.part + part_stride + off);
      }
    }
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      if (ok[j]) mlp_epilogue_store<T, kHasRes>(p, rr[j], ff[j], in[j], s[j], sr[j]);
    }
  }
}

// ================================================================ GEMM path helpers (cuBLAS does the GEMMs)
// x[r, :] = [xs[r] | embed[tok[r, 0]] | ...] into a contiguous [R, K] buffer (the first block's input).
template <typename T>
__global__ void __launch_bounds__(256) mlp_gather_kernel(const MlpBlockParams p, T* __restrict__ dst) {
  const int64_t total = static_cast<int64_t>(p.R) * p.K;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int r = static_cast<int>(i / p.K);
    const int k = static_cast<int>(i % p.K);
    const int seg = k / p.d, c = k % p.d;
    const T* row = input_row<T>(p, r, seg);
    dst[i] = seg == 0 ? row[c * p.xs1] : row[c];
  }
}

// out[r, f] = res[r, f] + silu(y[r, f]); y = W x + b and res = Wr x + br (or x) already computed.
template <typename T>
__global__ void __launch_bounds__(256) mlp_silu_residual_kernel(const T* __restrict__ y, const T* __restrict__ res,
                                                                int64_t res_s0, int64_t res_s1, T* __restrict__ out,
                                                                int R, int d) {
  const int64_t total = static_cast<int64_t>(R) * d;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / d, f = i % d;
    const float v = to_float(y[i]);
    out[i] = from_float<T>(to_float(res[r * res_s0 + f * res_s1]) + v / (1.f + __expf(-v)));
  }
}

// ================================================================ launchers
// Rows per CTA of the tensor-core path for R rows: 8, 16, 32 or 64.
inline int mlp_row_tile(int R) { return R <= 8 ? 8 : R <= 16 ? 16 : R <= 32 ? 32 : 64; }

template <typename T, int kNT, bool kHasRes>
cudaError_t launch_mlp_block_mma(const MlpBlockParams& p, cudaStream_t stream, bool pdl) {
  const dim3 grid(ceil_div(p.d, kMlpFeatures), p.ksplit, ceil_div(p.R, 8 * kNT));
  return launch_kernel(mlp_block_mma_kernel<T, kNT, kHasRes>, grid, dim3(kMlpWarps * 32), 0, stream, pdl, p);
}

inline unsigned elementwise_blocks(int64_t total) {
  return static_cast<unsigned>(std::min<int64_t>(ceil_div64(total, 256), 4096));
}

template <typename T>
cudaError_t launch_mlp_gather(const MlpBlockParams& p, T* dst, cudaStream_t stream) {
  const int64_t total = static_cast<int64_t>(p.R) * p.K;
  if (total == 0) return cudaSuccess;
  mlp_gather_kernel<T><<<elementwise_blocks(total), 256, 0, stream>>>(p, dst);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_mlp_silu_residual(const T* y, const T* res, int64_t res_s0, int64_t res_s1, T* out, int R, int d,
                                     cudaStream_t stream) {
  const int64_t total = static_cast<int64_t>(R) * d;
  if (total == 0) return cudaSuccess;
  mlp_silu_residual_kernel<T><<<elementwise_blocks(total), 256, 0, stream>>>(y, res, res_s0, res_s1, out, R, d);
  return cudaGetLastError();
}

}  // namespace hydra_fast::kernels

// Tree acceptance (greedy and typical) in two launches. See reference.accept_greedy / accept_typical.
//
// Phase 1, accept_chunk_stats_kernel: every row (b, node) of the logits is cut into chunks of kAcceptChunk
// vocabulary entries; one warp reads one chunk once (16-byte streaming loads, all in flight together) and
// writes a 16-byte state:
//   greedy : (max value, -, -, first index of the max)   NaN counts as the max, as torch.argmax does
//   typical: (max m, z = sum exp((x - m) / T), a = sum exp((x - m) / T) * (x - m) / T, -)
// Chunks are independent, so the grid is B * N * chunks warps: the whole GPU reads the logits.
//
// Phase 2, accept_tree_kernel: one CTA per sequence. It merges the chunk states of each row (argmax, or
// max / log-sum-exp / entropy), derives each node's parent from the paths, judges every node against its
// parent's row, walks the paths, picks the best one with the reference's tie-breaking, and writes the
// outputs. Typical's extra token is the inverse-CDF draw at the last accepted node: the chunk sums (double)
// locate the chunk, then a block-wide scan inside that one chunk finds the first index whose CDF exceeds
// u * total.
#pragma once

#include "common.cuh"

namespace hydra_fast::kernels {

constexpr int kAcceptChunk = 2048;  // vocabulary entries per warp in phase 1 (64 per lane)
constexpr int kAcceptWarps = 8;     // phase-1 warps per CTA
constexpr int kTreeThreads = 256;   // phase-2 threads per CTA

struct AcceptParams {
  const void* logits;  // [B, N, V], last dim contiguous
  int64_t ls0, ls1;
  const int64_t* cand;  // [B, N]
  int64_t cs0, cs1;
  const int64_t* paths;  // [P, L]
  int64_t ps0, ps1;
  const float* uniform;  // [B] (typical)
  int64_t us0;
  float4* states;  // [B, N, chunks] phase-1 scratch
  int64_t* accept_len;      // [B]
  int64_t* out_tokens;      // [B, L]
  int64_t* accepted_nodes;  // [B, L]
  int B, N, P, L;
  int64_t V;
  int chunks;
  float inv_temp;      // 1 / T
  double temperature;  // T
  double posterior_threshold, posterior_alpha;
};

// a beats b: NaN first, then the larger value, then the lower index (torch.argmax picks the first max).
__device__ __forceinline__ bool argmax_better(float a, int ia, float b, int ib) {
  const bool na = is_nan(a), nb = is_nan(b);
  if (na != nb) return na;
  if (!na && a != b) return a > b;
  return ia < ib;
}

// Merge two (m, z, a) softmax states; a state with z == 0 holds nothing.
__device__ __forceinline__ void softmax_merge(float& m, float& z, float& a, float m2, float z2, float a2,
                                              float inv_temp) {
  if (z2 == 0.f) return;
  if (z == 0.f) {
    m = m2, z = z2, a = a2;
    return;
  }
  const float M = fmaxf(m, m2);
  const float d1 = (m - M) * inv_temp, d2 = (m2 - M) * inv_temp;  // <= 0, natural-log units
  const float f1 = __expf(d1), f2 = __expf(d2);
  a = f1 * (a + d1 * z) + f2 * (a2 + d2 * z2);
  z = f1 * z + f2 * z2;
  m = M;
}

// ---------------------------------------------------------------------------------------------- phase 1
// kVec: elements per load (16 bytes, or 1 for rows that are not 16-byte aligned).
template <typename T, bool kTypical, int kVec>
__global__ void __launch_bounds__(kAcceptWarps * 32) accept_chunk_stats_kernel(const AcceptParams p) {
  constexpr int kPerLane = kAcceptChunk / 32;
  constexpr int kLoads = kPerLane / kVec;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t gw = static_cast<int64_t>(blockIdx.x) * kAcceptWarps + warp;
  const int64_t total = static_cast<int64_t>(p.B) * p.N * p.chunks;
  if (gw >= total) return;
  const int64_t row = gw / p.chunks;
  const int c = static_cast<int>(gw % p.chunks);
  const int b = static_cast<int>(row / p.N), n = static_cast<int>(row % p.N);
  const T* base = static_cast<const T*>(p.logits) + b * p.ls0 + n * p.ls1;
  const int64_t c0 = static_cast<int64_t>(c) * kAcceptChunk;

  // All loads first (kLoads independent requests per lane), then the math.
  float x[kPerLane];
  if constexpr (kVec > 1) {
    uint4 raw[kLoads];
#pragma unroll
    for (int i = 0; i < kLoads; ++i) {
      const int64_t e = c0 + static_cast<int64_t>(i * 32 + lane) * kVec;
      raw[i] = e < p.V ? ld_stream_u4(base + e) : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int i = 0; i < kLoads; ++i) {
      const int64_t e = c0 + static_cast<int64_t>(i * 32 + lane) * kVec;
      unpack16<T>(raw[i], x + i * kVec);
      if (e >= p.V) {
#pragma unroll
        for (int j = 0; j < kVec; ++j) x[i * kVec + j] = neg_inf();
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < kLoads; ++i) {
      const int64_t e = c0 + i * 32 + lane;
      x[i] = e < p.V ? to_float(base[e]) : neg_inf();
    }
  }
  // Element i * kVec + j of this lane is vocabulary entry c0 + (i * 32 + lane) * kVec + j.
  auto index_of = [&](int k) {
    return static_cast<int>(c0 + static_cast<int64_t>((k / kVec) * 32 + lane) * kVec + (k % kVec));
  };

  float4 state;
  if constexpr (!kTypical) {
    float best = x[0];
    int best_i = index_of(0);
#pragma unroll
    for (int k = 1; k < kPerLane; ++k) {
      // Within a lane indices increase with k, so "strictly better, or NaN over non-NaN" keeps the first.
      const bool nb = is_nan(best), nx = is_nan(x[k]);
      if ((!nb && (nx || x[k] > best))) best = x[k], best_i = index_of(k);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ob = __shfl_xor_sync(0xffffffffu, best, o);
      const int oi = __shfl_xor_sync(0xffffffffu, best_i, o);
      if (argmax_better(ob, oi, best, best_i)) best = ob, best_i = oi;
    }
    state = make_float4(best, 0.f, 0.f, __int_as_float(best_i));
  } else {
    float m = neg_inf();
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) m = fmaxf(m, x[k]);
    float z = 0.f, a = 0.f;
    if (m != neg_inf()) {
      const float k2 = p.inv_temp * 1.4426950408889634f;
#pragma unroll
      for (int k = 0; k < kPerLane; ++k) {
        const float e = exp2f((x[k] - m) * k2);
        z += e;
        if (e > 0.f) a = fmaf(e, (x[k] - m) * p.inv_temp, a);  // 0 * log 0 counts as 0
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
      const float z2 = __shfl_xor_sync(0xffffffffu, z, o);
      const float a2 = __shfl_xor_sync(0xffffffffu, a, o);
      softmax_merge(m, z, a, m2, z2, a2, p.inv_temp);
    }
    state = make_float4(m, z, a, 0.f);
  }
  if (lane == 0) p.states[gw] = state;
}

// ---------------------------------------------------------------------------------------------- phase 2
// Dynamic shared memory of accept_tree_kernel.
inline size_t accept_tree_smem_bytes(int N, bool typical) {
  const size_t per_node = typical ? (3 * sizeof(double) + sizeof(float) + sizeof(int) + 1) : (2 * sizeof(int) + 1);
  return per_node * static_cast<size_t>(N) + 16;
}

template <typename T, bool kTypical>
__global__ void __launch_bounds__(kTreeThreads) accept_tree_kernel(const AcceptParams p) {
  constexpr int kWarps = kTreeThreads / 32;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int N = p.N, L = p.L, P = p.P;
  // Layout: doubles first (typical), then 4-byte arrays, then bytes.
  double* logz = reinterpret_cast<double*>(smem_raw);  // [N] log sum exp((x - max) / T)   (typical)
  double* thr = logz + (kTypical ? N : 0);              // [N] min(eps, alpha * exp(-H))   (typical)
  double* cand_lp = thr + (kTypical ? N : 0);           // [N] log p_parent(token)         (typical)
  float* rmax = reinterpret_cast<float*>(cand_lp + (kTypical ? N : 0));  // [N] row max   (typical)
  int* amax = reinterpret_cast<int*>(rmax + (kTypical ? N : 0));         // [N] argmax    (greedy)
  int* parent = amax + (kTypical ? 0 : N);                               // [N]
  unsigned char* match = reinterpret_cast<unsigned char*>(parent + N);   // [N]

  __shared__ int s_best, s_acc, s_found, s_last_pos;
  __shared__ double s_warp[kWarps];

  const int b = blockIdx.x;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const float4* st = p.states + static_cast<int64_t>(b) * N * p.chunks;
  const T* lg = static_cast<const T*>(p.logits) + b * p.ls0;
  const int64_t* cand = p.cand + b * p.cs0;
  auto path_at = [&](int q, int j) { return p.paths[q * p.ps0 + j * p.ps1]; };

  for (int n = tid; n < N; n += kTreeThreads) parent[n] = -1;

  // 1. Row statistics from the chunk states, one warp per row.
  for (int n = warp; n < N; n += kWarps) {
    const float4* rs = st + static_cast<int64_t>(n) * p.chunks;
    if constexpr (!kTypical) {
      float best = neg_inf();
      int best_i = 0x7fffffff;
      for (int c = lane; c < p.chunks; c += 32) {
        const float4 s = rs[c];
        if (argmax_better(s.x, __float_as_int(s.w), best, best_i)) best = s.x, best_i = __float_as_int(s.w);
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        const float ob = __shfl_xor_sync(0xffffffffu, best, o);
        const int oi = __shfl_xor_sync(0xffffffffu, best_i, o);
        if (argmax_better(ob, oi, best, best_i)) best = ob, best_i = oi;
      }
      if (lane == 0) amax[n] = best_i;
    } else {
      float m = neg_inf(), z = 0.f, a = 0.f;
      for (int c = lane; c < p.chunks; c += 32) {
        const float4 s = rs[c];
        softmax_merge(m, z, a, s.x, s.y, s.z, p.inv_temp);
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
        const float z2 = __shfl_xor_sync(0xffffffffu, z, o);
        const float a2 = __shfl_xor_sync(0xffffffffu, a, o);
        softmax_merge(m, z, a, m2, z2, a2, p.inv_temp);
      }
      if (lane == 0) {
        const double lz = log(static_cast<double>(z));
        const double entropy = lz - static_cast<double>(a) / static_cast<double>(z);
        rmax[n] = m;
        logz[n] = lz;
        thr[n] = fmin(p.posterior_alpha * exp(-entropy), p.posterior_threshold);
      }
    }
  }
  __syncthreads();

  // 2. Parents: every (parent, child) pair along a path. Children outside [0, N) are ignored.
  for (int idx = tid; idx < P * (L - 1); idx += kTreeThreads) {
    const int q = idx / (L - 1), j = idx % (L - 1) + 1;
    const int64_t child = path_at(q, j);
    if (child >= 0 && child < N) parent[child] = static_cast<int>(path_at(q, j - 1));
  }
  __syncthreads();

  // 3. Judge every node's token under its parent's row (the root's own row for the root).
  for (int n = tid; n < N; n += kTreeThreads) {
    const int par = min(max(parent[n], 0), N - 1);
    const int64_t tok = cand[n * p.cs1];
    if constexpr (!kTypical) {
      match[n] = static_cast<int64_t>(amax[par]) == tok;
    } else {
      // A negative token counts from the end (Python indexing in the reference), then clamp into [0, V).
      int64_t tk = tok < 0 ? tok + p.V : tok;
      tk = min(max(tk, int64_t(0)), p.V - 1);
      const double x = static_cast<double>(to_float(lg[par * p.ls1 + tk]));
      const double lp = (x - static_cast<double>(rmax[par])) / p.temperature - logz[par];
      cand_lp[n] = lp;
      match[n] = exp(lp) > thr[par];
    }
  }
  __syncthreads();

  // 4. Walk the paths (warp 0): accepted length, key, best path with the lowest index on ties.
  if (warp == 0) {
    double best_key = -1.0;
    int best_q = 0x7fffffff, best_acc = 0;
    bool have = false;
    for (int q = lane; q < P; q += 32) {
      int acc = 0;
      while (acc + 1 < L) {
        const int64_t nd = path_at(q, acc + 1);
        if (nd < 0 || nd >= N || !match[nd]) break;
        ++acc;
      }
      double key = static_cast<double>(acc);
      if constexpr (kTypical) {
        double score = 0.0;
        for (int j = 1; j <= acc; ++j) score += cand_lp[path_at(q, j)];
        key = static_cast<double>(acc) * 1e6 + score;
      }
      if (!have || key > best_key) best_key = key, best_q = q, best_acc = acc, have = true;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const double ok = __shfl_xor_sync(0xffffffffu, best_key, o);
      const int oq = __shfl_xor_sync(0xffffffffu, best_q, o);
      const int oa = __shfl_xor_sync(0xffffffffu, best_acc, o);
      const bool oh = __shfl_xor_sync(0xffffffffu, have, o);
      if (oh && (!have || ok > best_key || (ok == best_key && oq < best_q))) {
        best_key = ok, best_q = oq, best_acc = oa, have = true;
      }
    }
    if (lane == 0) {
      s_best = best_q;
      s_acc = best_acc;
      s_found = 0x7fffffff;
      s_last_pos = -1;
    }
  }
  __syncthreads();
  const int best = s_best, acc = s_acc;
  const int last = static_cast<int>(min(max(path_at(best, acc), int64_t(0)), int64_t(N - 1)));

  // 5. The extra token.
  int64_t extra;
  if constexpr (!kTypical) {
    extra = amax[last];
  } else {
    const float4* rs = st + static_cast<int64_t>(last) * p.chunks;
    const double M = rmax[last];
    // 5a. Locate the chunk (warp 0): chunk weight w_c = z_c * exp((m_c - M) / T); prefix sums in double.
    __shared__ int s_chunk;
    __shared__ double s_rem;
    if (warp == 0) {
      double total = 0.0;
      for (int c0 = 0; c0 < p.chunks; c0 += 32) {
        const int c = c0 + lane;
        double w = 0.0;
        if (c < p.chunks) {
          const float4 s = rs[c];
          if (s.y > 0.f) w = static_cast<double>(s.y) * exp((static_cast<double>(s.x) - M) / p.temperature);
        }
        total += warp_sum(w);
      }
      const double target = static_cast<double>(p.uniform[b * p.us0]) * total;
      double before = 0.0;
      int chunk = -1;
      double rem = 0.0;
      for (int c0 = 0; c0 < p.chunks && chunk < 0; c0 += 32) {
        const int c = c0 + lane;
        double w = 0.0;
        if (c < p.chunks) {
          const float4 s = rs[c];
          if (s.y > 0.f) w = static_cast<double>(s.y) * exp((static_cast<double>(s.x) - M) / p.temperature);
        }
        double incl = w;  // inclusive scan over the 32 chunks of this round
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
          const double y = __shfl_up_sync(0xffffffffu, incl, o);
          if (lane >= o) incl += y;
        }
        const unsigned crossed = __ballot_sync(0xffffffffu, c < p.chunks && before + incl > target);
        if (crossed != 0u) {
          const int src = __ffs(crossed) - 1;
          const double incl_src = __shfl_sync(0xffffffffu, incl, src);
          const double w_src = __shfl_sync(0xffffffffu, w, src);
          chunk = c0 + src;
          // Remaining mass inside the chunk, in that chunk's own units (relative to its max m_c).
          const float4 s = rs[chunk];
          rem = (target - (before + incl_src - w_src)) / exp((static_cast<double>(s.x) - M) / p.temperature);
        }
        before += __shfl_sync(0xffffffffu, incl, 31);
      }
      if (lane == 0) {
        s_chunk = chunk;
        s_rem = rem;
      }
    }
    __syncthreads();
    const int chunk = s_chunk;
    if (chunk < 0) {
      extra = p.V - 1;  // u * total >= total: every CDF entry <= target, clamped as the reference does
    } else {
      // 5b. Block-wide scan over the chunk: 8 consecutive entries per thread.
      constexpr int kPer = kAcceptChunk / kTreeThreads;
      const float mc = rs[chunk].x;
      const float k2 = p.inv_temp * 1.4426950408889634f;
      const int64_t e0 = static_cast<int64_t>(chunk) * kAcceptChunk + tid * kPer;
      const T* row = lg + last * p.ls1;
      float e[kPer];
      double local = 0.0;
      int last_pos = -1;
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        e[i] = 0.f;
        if (e0 + i < p.V) e[i] = exp2f((to_float(row[e0 + i]) - mc) * k2);
        local += e[i];
        if (e[i] > 0.f) last_pos = static_cast<int>(e0 + i);
      }
      double incl = local;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const double y = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += y;
      }
      if (lane == 31) s_warp[warp] = incl;
      __syncthreads();
      double run = incl - local;
      for (int w = 0; w < warp; ++w) run += s_warp[w];
      const double rem = s_rem;
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        run += e[i];
        if (run > rem && e[i] > 0.f) {
          atomicMin(&s_found, static_cast<int>(e0 + i));
          break;
        }
      }
      if (last_pos >= 0) atomicMax(&s_last_pos, last_pos);
      __syncthreads();
      // Rounding can leave the target just past this chunk's own sum: take its last positive entry.
      extra = s_found != 0x7fffffff ? s_found : (s_last_pos >= 0 ? s_last_pos : p.V - 1);
    }
  }

  // 6. Outputs.
  if (tid == 0) p.accept_len[b] = acc;
  for (int j = tid; j < L; j += kTreeThreads) {
    p.accepted_nodes[static_cast<int64_t>(b) * L + j] = j <= acc ? path_at(best, j) : -1;
    int64_t token = -1;
    if (j < acc) {
      const int64_t next = min(max(path_at(best, j + 1), int64_t(0)), int64_t(N - 1));
      token = cand[next * p.cs1];
    } else if (j == acc) {
      token = extra;
    }
    p.out_tokens[static_cast<int64_t>(b) * L + j] = token;
  }
}

template <typename T, bool kTypical>
cudaError_t launch_accept(const AcceptParams& p, bool vec16, cudaStream_t stream) {
  const int64_t warps = static_cast<int64_t>(p.B) * p.N * p.chunks;
  const int64_t blocks = ceil_div64(warps, kAcceptWarps);
  if (blocks > 0x7fffffff || p.B > 0x7fffffff) return cudaErrorInvalidConfiguration;
  if (vec16) {
    accept_chunk_stats_kernel<T, kTypical, 16 / sizeof(T)>
        <<<static_cast<unsigned>(blocks), kAcceptWarps * 32, 0, stream>>>(p);
  } else {
    accept_chunk_stats_kernel<T, kTypical, 1><<<static_cast<unsigned>(blocks), kAcceptWarps * 32, 0, stream>>>(p);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const size_t smem = accept_tree_smem_bytes(p.N, kTypical);
  auto kernel = accept_tree_kernel<T, kTypical>;
  if (smem > 48 * 1024) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  kernel<<<p.B, kTreeThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace hydra_fast::kernels

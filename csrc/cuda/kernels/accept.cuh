// Tree acceptance (greedy and typical) in two launches. See reference.accept_greedy / accept_typical.
//
// Phase 1, accept_chunk_stats_kernel: every row (b, node) of the logits is cut into chunks of kAcceptChunk
// vocabulary entries. A persistent grid (as many CTAs as fit at once) walks the chunks; each warp reads its
// chunks in rounds of eight 16-byte streaming loads per lane, the next round's loads (possibly of its next
// chunk) in flight while the current round is reduced, and writes one 16-byte state per chunk:
//   greedy : (max value, -, -, first index of the max)   NaN counts as the max, as torch.argmax does
//   typical: (max m, z = sum exp((x - m) / T), a = sum exp((x - m) / T) * (x - m) / T, -)
// Chunks are independent, so the grid is B * N * chunks warps: the whole GPU reads the logits.
//
// Phase 2, accept_tree_kernel: one CTA per sequence. It merges the chunk states of each row (argmax, or
// max / log-sum-exp / entropy), derives each node's parent from the paths (the batch's one tree [P, L], or the
// sequence's own [B, P, L]: psb, the batch stride, is 0 for the shared form), judges every node against its
// parent's row, walks the paths, picks the best one with the reference's tie-breaking, and writes the
// outputs. Typical's extra token is the inverse-CDF draw at the last accepted node: the chunk sums (double)
// locate the chunk, then a block-wide scan inside that one chunk finds the first index whose CDF exceeds
// u * total.
#pragma once

#include <algorithm>

#include "common.cuh"

namespace hydra_fast::kernels {

constexpr int kAcceptChunk = 2048;  // vocabulary entries per phase-1 work item (64 per lane)
constexpr int kAcceptWarps = 4;     // phase-1 warps per CTA
constexpr int kAcceptLoads = 8;     // 16-byte loads per lane per round
constexpr int kTreeThreads = 256;   // phase-2 threads per CTA

struct AcceptParams {
  const void* logits;  // [B, N, V], last dim contiguous
  int64_t ls0, ls1;
  const int64_t* cand;  // [B, N]
  int64_t cs0, cs1;
  const int64_t* paths;  // [P, L], sequence b's at paths + b * psb
  int64_t psb, ps0, ps1;  // psb: 0 for one tree shared by the batch
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
template <typename T, int kVec>
__device__ __forceinline__ void load_round(const T* base, int64_t e0, int lane, int64_t V, uint4* raw) {
#pragma unroll
  for (int i = 0; i < kAcceptLoads; ++i) {
    const int64_t e = e0 + static_cast<int64_t>(i * 32 + lane) * kVec;
    if constexpr (kVec > 1) {
      raw[i] = e < V ? ld_stream_u4(base + e) : make_uint4(0u, 0u, 0u, 0u);
    } else {
      raw[i].x = e < V ? __float_as_uint(to_float(base[e])) : 0u;
    }
  }
}

template <typename T, bool kTypical, int kVec>
__global__ void __launch_bounds__(kAcceptWarps * 32) accept_chunk_stats_kernel(const AcceptParams p) {
  constexpr int kRoundElems = 32 * kAcceptLoads * kVec;
  constexpr int kRounds = kAcceptChunk / kRoundElems;
  static_assert(kAcceptChunk % kRoundElems == 0, "chunk must be whole rounds");
  constexpr int kE = kAcceptLoads * kVec;  // elements per lane per round
  constexpr int kNone = 0x7fffffff;
  const int lane = threadIdx.x & 31;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kAcceptWarps;
  const int64_t total = static_cast<int64_t>(p.B) * p.N * p.chunks;
  int64_t ci = static_cast<int64_t>(blockIdx.x) * kAcceptWarps + (threadIdx.x >> 5);
  if (ci >= total) return;
  const float k2 = p.inv_temp * 1.4426950408889634f;
  auto row_of = [&](int64_t item) {
    const int64_t row = item / p.chunks;
    return static_cast<const T*>(p.logits) + (row / p.N) * p.ls0 + (row % p.N) * p.ls1;
  };
  auto first_of = [&](int64_t item) { return static_cast<int64_t>(item % p.chunks) * kAcceptChunk; };

  // greedy: best value and its index; typical: (m, z, a) of this lane's part of the current chunk
  float best = neg_inf(), m = neg_inf(), z = 0.f, a = 0.f;
  int best_i = kNone;
  int r = 0;
  uint4 cur[kAcceptLoads], nxt[kAcceptLoads];
  const T* base = row_of(ci);
  int64_t c0 = first_of(ci);
  load_round<T, kVec>(base, c0, lane, p.V, cur);
  while (true) {
    // Prefetch the next round: the next of this chunk, or the first of this warp's next chunk.
    int64_t nci = ci;
    int nr = r + 1;
    if (nr == kRounds) nr = 0, nci = ci + stride;
    const bool has_next = nci < total;
    const T* nbase = base;
    int64_t nc0 = c0;
    if (has_next) {
      if (nci != ci) nbase = row_of(nci), nc0 = first_of(nci);
      load_round<T, kVec>(nbase, nc0 + static_cast<int64_t>(nr) * kRoundElems, lane, p.V, nxt);
    }

    // Element j of load i is vocabulary entry e0 + (i * 32 + lane) * kVec + j; entries >= V are -inf.
    const int64_t e0 = c0 + static_cast<int64_t>(r) * kRoundElems;
    float x[kE];
#pragma unroll
    for (int i = 0; i < kAcceptLoads; ++i) {
      if constexpr (kVec > 1) {
        unpack16<T>(cur[i], x + i * kVec);
      } else {
        x[i] = __uint_as_float(cur[i].x);
      }
      const int64_t e = e0 + static_cast<int64_t>(i * 32 + lane) * kVec;
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        if (e + j >= p.V) x[i * kVec + j] = neg_inf();
      }
    }
    if constexpr (!kTypical) {
      // The round's first maximum without a serial chain: NaN positions first, else max, then the lowest
      // position holding it (a lane's indices grow with k). Ties with earlier rounds keep the earlier index.
      int knan = kNone;
      float mr = neg_inf();
#pragma unroll
      for (int k = 0; k < kE; ++k) {
        knan = min(knan, is_nan(x[k]) ? k : kNone);
        mr = fmaxf(mr, x[k]);
      }
      int kf = knan;
      if (kf == kNone) {
#pragma unroll
        for (int k = 0; k < kE; ++k) kf = min(kf, x[k] == mr ? k : kNone);
      }
      if (kf != kNone) {
        float v = mr;  // x[kf] without a run-time register index (knan case: a NaN)
#pragma unroll
        for (int k = 0; k < kE; ++k) v = k == kf ? x[k] : v;
        const int idx = static_cast<int>(e0 + static_cast<int64_t>((kf / kVec) * 32 + lane) * kVec + (kf % kVec));
        if (best_i == kNone || argmax_better(v, idx, best, best_i)) best = v, best_i = idx;
      }
    } else {
      float mr = neg_inf();
#pragma unroll
      for (int k = 0; k < kE; ++k) mr = fmaxf(mr, x[k]);
      float zr = 0.f, ar = 0.f;
      if (mr != neg_inf()) {
#pragma unroll
        for (int k = 0; k < kE; ++k) {
          const float e = exp2f((x[k] - mr) * k2);
          zr += e;
          if (e > 0.f) ar = fmaf(e, (x[k] - mr) * p.inv_temp, ar);  // 0 * log 0 counts as 0
        }
      }
      softmax_merge(m, z, a, mr, zr, ar, p.inv_temp);
    }

    if (r == kRounds - 1) {  // chunk done: reduce over the warp, write, reset
      float4 state;
      if constexpr (!kTypical) {
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
          const float ob = __shfl_xor_sync(0xffffffffu, best, o);
          const int oi = __shfl_xor_sync(0xffffffffu, best_i, o);
          if (argmax_better(ob, oi, best, best_i)) best = ob, best_i = oi;
        }
        state = make_float4(best, 0.f, 0.f, __int_as_float(best_i));
        best = neg_inf(), best_i = kNone;
      } else {
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
          const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
          const float z2 = __shfl_xor_sync(0xffffffffu, z, o);
          const float a2 = __shfl_xor_sync(0xffffffffu, a, o);
          softmax_merge(m, z, a, m2, z2, a2, p.inv_temp);
        }
        state = make_float4(m, z, a, 0.f);
        m = neg_inf(), z = 0.f, a = 0.f;
      }
      if (lane == 0) p.states[ci] = state;
    }
    if (!has_next) break;
#pragma unroll
    for (int i = 0; i < kAcceptLoads; ++i) cur[i] = nxt[i];
    ci = nci, r = nr, base = nbase, c0 = nc0;
  }
}

// ---------------------------------------------------------------------------------------------- phase 2
// Dynamic shared memory of accept_tree_kernel: per-node arrays, and the paths as int32 when they fit.
inline size_t accept_tree_smem_bytes(int N, int P, int L, bool typical, bool paths_in_smem) {
  const size_t per_node = typical ? (sizeof(int64_t) + 4 * sizeof(float) + sizeof(int) + 1)
                                  : (sizeof(int64_t) + 2 * sizeof(int) + 1);
  return per_node * static_cast<size_t>(N) + (paths_in_smem ? sizeof(int) * static_cast<size_t>(P) * L : 0) + 16;
}
constexpr size_t kAcceptSmemLimit = 160 * 1024;

template <typename T, bool kTypical>
__global__ void __launch_bounds__(kTreeThreads) accept_tree_kernel(const AcceptParams p, bool paths_in_smem) {
  constexpr int kWarps = kTreeThreads / 32;
  constexpr int kRowBatch = 8;  // rows whose chunk states one warp loads together
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int N = p.N, L = p.L, P = p.P;
  // Layout: 8-byte arrays first, then 4-byte arrays, then bytes.
  // Float statistics: their rounding (~1e-7) is far below that of the fp32 exp sums they come from.
  int64_t* cand = reinterpret_cast<int64_t*>(smem_raw);                        // [N] drafted tokens
  float* logz = reinterpret_cast<float*>(cand + N);                            // [N] log sum exp((x - max) / T)
  float* thr = logz + (kTypical ? N : 0);                                      // [N] min(eps, alpha exp(-H))
  float* cand_lp = thr + (kTypical ? N : 0);                                   // [N] log p_parent(token)
  float* rmax = cand_lp + (kTypical ? N : 0);                                  // [N] row max
  int* amax = reinterpret_cast<int*>(rmax + (kTypical ? N : 0));            // [N] argmax    (greedy)
  int* parent = amax + (kTypical ? 0 : N);                                  // [N]
  int* paths_s = parent + N;                                                // [P, L] if paths_in_smem
  unsigned char* match = reinterpret_cast<unsigned char*>(paths_s + (paths_in_smem ? P * L : 0));  // [N]

  __shared__ int s_best, s_acc, s_found, s_last_pos, s_chunk;
  __shared__ double s_rem;
  __shared__ double s_warp[kWarps];

  const int b = blockIdx.x;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const float4* st = p.states + static_cast<int64_t>(b) * N * p.chunks;
  const T* lg = static_cast<const T*>(p.logits) + b * p.ls0;
  const int64_t* paths = p.paths + b * p.psb;  // this sequence's tree
  auto path_at = [&](int q, int j) -> int64_t {
    return paths_in_smem ? static_cast<int64_t>(paths_s[q * L + j]) : paths[q * p.ps0 + j * p.ps1];
  };

  // 0. Stage the tree and the drafted tokens.
  for (int n = tid; n < N; n += kTreeThreads) {
    parent[n] = -1;
    cand[n] = p.cand[b * p.cs0 + n * p.cs1];
  }
  if (paths_in_smem) {
    for (int idx = tid; idx < P * L; idx += kTreeThreads) {
      const int64_t v = paths[(idx / L) * p.ps0 + (idx % L) * p.ps1];
      paths_s[idx] = static_cast<int>(max(min(v, int64_t(0x7fffffff)), int64_t(-1)));  // < 0 only matters as < 0
    }
  }

  // 1. Row statistics from the chunk states: one warp per row, kRowBatch rows' loads in flight at once.
  for (int n0 = warp; n0 < N; n0 += kWarps * kRowBatch) {
    float bv[kRowBatch], m[kRowBatch], z[kRowBatch], a[kRowBatch];
    int bi[kRowBatch];
#pragma unroll
    for (int i = 0; i < kRowBatch; ++i) bv[i] = m[i] = neg_inf(), z[i] = a[i] = 0.f, bi[i] = 0x7fffffff;
    for (int c = lane; c < p.chunks; c += 32) {
      float4 v[kRowBatch];
#pragma unroll
      for (int i = 0; i < kRowBatch; ++i) {
        const int n = n0 + i * kWarps;
        v[i] = n < N ? st[static_cast<int64_t>(n) * p.chunks + c] : make_float4(neg_inf(), 0.f, 0.f, __int_as_float(0x7fffffff));
      }
#pragma unroll
      for (int i = 0; i < kRowBatch; ++i) {
        if constexpr (!kTypical) {
          if (argmax_better(v[i].x, __float_as_int(v[i].w), bv[i], bi[i])) bv[i] = v[i].x, bi[i] = __float_as_int(v[i].w);
        } else {
          softmax_merge(m[i], z[i], a[i], v[i].x, v[i].y, v[i].z, p.inv_temp);
        }
      }
    }
#pragma unroll
    for (int i = 0; i < kRowBatch; ++i) {
      // xor shuffles leave the reduced state in every lane; lane i finishes row i.
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        if constexpr (!kTypical) {
          const float ob = __shfl_xor_sync(0xffffffffu, bv[i], o);
          const int oi = __shfl_xor_sync(0xffffffffu, bi[i], o);
          if (argmax_better(ob, oi, bv[i], bi[i])) bv[i] = ob, bi[i] = oi;
        } else {
          const float m2 = __shfl_xor_sync(0xffffffffu, m[i], o);
          const float z2 = __shfl_xor_sync(0xffffffffu, z[i], o);
          const float a2 = __shfl_xor_sync(0xffffffffu, a[i], o);
          softmax_merge(m[i], z[i], a[i], m2, z2, a2, p.inv_temp);
        }
      }
    }
#pragma unroll
    for (int i = 0; i < kRowBatch; ++i) {
      const int n = n0 + i * kWarps;
      if (lane == i && n < N) {
        if constexpr (!kTypical) {
          amax[n] = bi[i];
        } else {
          const float lz = __logf(z[i]);
          const float entropy = lz - a[i] / z[i];
          rmax[n] = m[i];
          logz[n] = lz;
          thr[n] = fminf(p.posterior_alpha * __expf(-entropy), p.posterior_threshold);
        }
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
    const int64_t tok = cand[n];
    if constexpr (!kTypical) {
      match[n] = static_cast<int64_t>(amax[par]) == tok;
    } else {
      // A negative token counts from the end (Python indexing in the reference), then clamp into [0, V).
      int64_t tk = tok < 0 ? tok + p.V : tok;
      tk = min(max(tk, int64_t(0)), p.V - 1);
      const float lp = (to_float(lg[par * p.ls1 + tk]) - rmax[par]) * p.inv_temp - logz[par];
      cand_lp[n] = lp;
      match[n] = __expf(lp) > thr[par];
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
        for (int j = 1; j <= acc; ++j) score += static_cast<double>(cand_lp[path_at(q, j)]);
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
    const float M = rmax[last];
    // 5a. Locate the chunk (warp 0): chunk weight w_c = z_c * exp((m_c - M) / T); prefix sums in double.
    if (warp == 0) {
      double total = 0.0;
      for (int c0 = 0; c0 < p.chunks; c0 += 32) {
        const int c = c0 + lane;
        double w = 0.0;
        if (c < p.chunks) {
          const float4 s = rs[c];
          if (s.y > 0.f) w = static_cast<double>(s.y * __expf((s.x - M) * p.inv_temp));
        }
        total += warp_sum(w);
      }
      const double target = static_cast<double>(p.uniform[b * p.us0]) * total;
      double before = 0.0;
      int chunk = -1;
      double rem = 0.0;
      for (int c0 = 0; c0 < p.chunks && chunk < 0; c0 += 32) {
        const int c = c0 + lane;
        double w = 0.0, f = 1.0;
        if (c < p.chunks) {
          const float4 s = rs[c];
          f = static_cast<double>(__expf((s.x - M) * p.inv_temp));
          if (s.y > 0.f) w = static_cast<double>(s.y * __expf((s.x - M) * p.inv_temp));
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
          const double f_src = __shfl_sync(0xffffffffu, f, src);
          chunk = c0 + src;
          // Remaining mass inside the chunk, in that chunk's own units (relative to its max m_c).
          rem = (target - (before + incl_src - w_src)) / f_src;
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
      // 5b. Block-wide scan over the chunk: kPer consecutive entries per thread, all loads in flight first.
      constexpr int kPer = kAcceptChunk / kTreeThreads;
      const float mc = rs[chunk].x;
      const float k2 = p.inv_temp * 1.4426950408889634f;
      const int64_t e0 = static_cast<int64_t>(chunk) * kAcceptChunk + tid * kPer;
      const T* row = lg + last * p.ls1;
      float e[kPer];
#pragma unroll
      for (int i = 0; i < kPer; ++i) e[i] = e0 + i < p.V ? to_float(row[e0 + i]) : neg_inf();
      double local = 0.0;
      int last_pos = -1;
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        e[i] = exp2f((e[i] - mc) * k2);
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
      int found = 0x7fffffff;
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        run += e[i];
        if (found == 0x7fffffff && run > rem && e[i] > 0.f) found = static_cast<int>(e0 + i);
      }
      if (found != 0x7fffffff) atomicMin(&s_found, found);
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
      token = cand[next];
    } else if (j == acc) {
      token = extra;
    }
    p.out_tokens[static_cast<int64_t>(b) * L + j] = token;
  }
}

template <typename T, bool kTypical>
cudaError_t launch_accept(const AcceptParams& p, bool vec16, int sms, cudaStream_t stream) {
  const int64_t warps = static_cast<int64_t>(p.B) * p.N * p.chunks;
  const int64_t blocks = ceil_div64(warps, kAcceptWarps);
  // Persistent grid: as many CTAs as are resident at once (no partial second wave), each looping.
  auto stats_kernel = vec16 ? accept_chunk_stats_kernel<T, kTypical, 16 / sizeof(T)>
                            : accept_chunk_stats_kernel<T, kTypical, 1>;
  int per_sm = 0;
  cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, stats_kernel, kAcceptWarps * 32, 0);
  if (err != cudaSuccess) return err;
  const int64_t grid = std::min<int64_t>(blocks, static_cast<int64_t>(std::max(per_sm, 1)) * sms);
  stats_kernel<<<static_cast<unsigned>(grid), kAcceptWarps * 32, 0, stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const bool paths_in_smem = accept_tree_smem_bytes(p.N, p.P, p.L, kTypical, true) <= kAcceptSmemLimit;
  const size_t smem = accept_tree_smem_bytes(p.N, p.P, p.L, kTypical, paths_in_smem);
  if (smem > kAcceptSmemLimit) return cudaErrorInvalidValue;
  auto kernel = accept_tree_kernel<T, kTypical>;
  if (smem > 48 * 1024) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  kernel<<<p.B, kTreeThreads, smem, stream>>>(p, paths_in_smem);
  return cudaGetLastError();
}

}  // namespace hydra_fast::kernels

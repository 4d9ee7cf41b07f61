// Tree attention: the N newest tokens of each sequence (a draft tree) attend to the KV cache [0, len) and to
// the tree slots len + j that tree_mask allows: one mask [N, N] for the batch, or one per sequence [B, N, N]
// (mask_sb, the batch stride, is 0 for the shared form). See reference.tree_attention (the specification).
//
// Split-KV flash decoding. A CTA owns (row tile, KV chunk, kv head, b): all its rows share one kv head, so one
// CTA streams its chunk of K/V once for every query head of the GQA group and every tree node (row r of a kv
// head is node r / group, q head kv_head * group + r % group). Row tiles of the same chunk are adjacent block
// indices, so K/V come from HBM once and from L2 after. Each CTA keeps an online softmax in registers and
// either writes the final rows (one chunk) or unnormalised partial rows plus (max, sum) that
// tree_attn_combine_kernel merges; on sm_90+ the tensor-core path with 2-8 chunks and one row tile per kv head
// instead runs the chunks of the tile as one thread-block cluster that merges them through distributed shared
// memory (cluster_combine), so the step has no combine kernel. (One tile: a plain step or a tree of up to
// 64 / group nodes. With more tiles the clusters were measured slower than the combine kernel on the H200, e.g.
// SmolLM2's 64-node step 1.80 against 1.71 ms; bench/RESULTS.md.) The chunking is computed on the device from
// cache_lens, so the work follows the real lengths (not the capacity S) and the launch stays graph-capturable.
//
// Paths:
//  * tree_attn_mma_kernel: fp16/bf16, D in {64, 128}, 16-byte aligned K/V rows. 4 warps x 16 rows, K/V tiles
//    of 64 positions through a cp.async ring in XOR-swizzled shared memory, S = Q K^T and O += P V on tensor
//    cores (mma.sync m16n8k16, fp32 accumulation; P is rounded to the input type, as in FlashAttention-2).
//  * tree_attn_simt_kernel: any dtype and D <= 256, fp32 math on CUDA cores (fp32 inputs, odd head dims,
//    misaligned views).
// Scores are kept in log2 units (scale * log2 e folded in), so exp2 is one MUFU op.
#pragma once

#include <cooperative_groups.h>

#include "common.cuh"

namespace hydra_fast::kernels {

struct TreeAttnParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;               // [B, N, Hq, D] contiguous
  const int32_t* lens;     // [B]
  const bool* mask;        // [N, N], sequence b's at mask + b * mask_sb
  float* part_o;           // [chunks, B, N, Hq, D], unnormalised (num_chunks > 1)
  float2* part_ml;         // [chunks, B, N, Hq]: (max in log2 units, sum of exp2)
  int64_t lens_stride, mask_sb, mask_s0, mask_s1;  // mask_sb: 0 for one mask shared by the batch
  int64_t q_sb, q_sh, q_sn;
  int64_t k_sb, k_sh, k_ss;
  int64_t v_sb, v_sh, v_ss;
  int B, Hq, Hkv, group, N, S, D;
  int rows;                // N * group: query rows per kv head
  int row_tiles;           // ceil(rows / rows per CTA)
  int num_chunks;
  float scale_log2;        // scale * log2(e)
};

// Chunks start at multiples of kChunkAlign (a multiple of every kernel's KV tile).
constexpr int kChunkAlign = 64;

struct SeqRange {
  int64_t len;    // cache_lens[b], as given
  int cache_end;  // [0, cache_end) is visible to every query
  int kv_end;     // [cache_end, kv_end) is the tree: slot pos is node pos - len, visible iff tree_mask allows
  const bool* mask;  // this sequence's tree_mask
};

__device__ __forceinline__ SeqRange seq_range(const TreeAttnParams& p, int b) {
  SeqRange r;
  r.len = p.lens[b * p.lens_stride];
  r.cache_end = static_cast<int>(min(max(r.len, int64_t(0)), int64_t(p.S)));
  r.kv_end = static_cast<int>(min(max(r.len + p.N, int64_t(0)), int64_t(p.S)));
  r.mask = p.mask + b * p.mask_sb;
  return r;
}

__device__ __forceinline__ int chunk_len(int kv_end, int num_chunks) {
  return ceil_div(ceil_div(max(kv_end, 1), num_chunks), kChunkAlign) * kChunkAlign;
}

// Number of chunks that hold positions for this sequence.
__device__ __forceinline__ int chunks_used(int kv_end, int num_chunks) {
  return min(num_chunks, ceil_div(kv_end, chunk_len(kv_end, num_chunks)));
}

__device__ __forceinline__ bool visible(const TreeAttnParams& p, const SeqRange& sr, int kv_stop, int pos, int node) {
  return pos < sr.cache_end ||
         (pos < kv_stop && sr.mask[node * p.mask_s0 + (static_cast<int64_t>(pos) - sr.len) * p.mask_s1]);
}

// ================================================================ tensor-core path (fp16 / bf16, D = 64 or 128)
template <int D, int kStages, typename T, int kTileN>
struct MmaAttnConfig {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kRows = 16 * kWarps;  // query rows per CTA
  static constexpr int kBN = kTileN;         // KV positions per tile
  static constexpr size_t kSmemBytes = size_t(kStages) * 2 * kBN * D * sizeof(T);
};

// The combine inside a cluster (sm_90+): the chunks of one row tile are the CTAs of a cluster. Each CTA puts its
// unnormalised rows o and their (max, sum) into its own shared memory (the K/V ring, drained), the cluster waits
// for all, then CTA `rank` merges rows rank, rank + C, ... reading the C CTAs' rows through distributed shared
// memory (one warp a row, as tree_attn_combine_kernel does with global partial rows), and the cluster waits again
// so that no CTA's shared memory goes away while another reads it. Saves the combine kernel's launch and the
// partial rows' round trip through global memory.
constexpr int kMaxClusterChunks = 8;  // the portable cluster size

template <typename T, int D>
__device__ __forceinline__ void cluster_combine(const TreeAttnParams& p, unsigned char* smem_raw, int tile, int rank,
                                                int kvh, int b, const float (&o)[D / 8][4], const float (&m)[2],
                                                const float (&l)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  constexpr int kRows = 64;  // rows of a tile (MmaAttnConfig::kRows)
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  cp_async_wait<0>();
  __syncthreads();  // the ring is no longer read or written
  float* sO = reinterpret_cast<float*>(smem_raw);                // [kRows][D]
  float2* sML = reinterpret_cast<float2*>(sO + kRows * D);       // [kRows]: (max in log2 units, sum)
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = warp * 16 + g + 8 * i;
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt) {
      *reinterpret_cast<float2*>(sO + r * D + nt * 8 + 2 * t) = make_float2(o[nt][2 * i], o[nt][2 * i + 1]);
    }
    if (t == 0) sML[r] = make_float2(m[i], l[i]);
  }
  cg::cluster_group cluster = cg::this_cluster();
  cluster.sync();  // every CTA's rows are written (release / acquire at cluster scope)
  const int C = p.num_chunks;
  const int rows_here = min(kRows, p.rows - tile * kRows);
  constexpr int kPer = D / 32;  // values of a row per lane: 2 (D = 64) or 4 (D = 128)
  for (int r = rank + C * warp; r < rows_here; r += C * 4) {
    const float2 ml = lane < C ? *cluster.map_shared_rank(sML + r, lane) : make_float2(neg_inf(), 0.f);
    const float M = warp_max(ml.x);
    const float Mu = M == neg_inf() ? 0.f : M;
    const float w = lane < C ? exp2f(ml.x - Mu) : 0.f;
    const float L = warp_sum(w * ml.y);
    const float inv = L > 0.f ? 1.f / L : quiet_nan();  // a row that sees nothing: NaN, as the reference
    float acc[kPer] = {};
    for (int c = 0; c < C; ++c) {
      const float wc = __shfl_sync(0xffffffffu, w, c);
      const float* src = cluster.map_shared_rank(sO + r * D + lane * kPer, c);
#pragma unroll
      for (int e = 0; e < kPer; ++e) acc[e] = fmaf(wc, src[e], acc[e]);
    }
    const int row = tile * kRows + r;
    const int node = row / p.group, head = kvh * p.group + row % p.group;
    T* orow = static_cast<T*>(p.out) + ((static_cast<int64_t>(b) * p.N + node) * p.Hq + head) * D + lane * kPer;
#pragma unroll
    for (int e = 0; e < kPer; e += 2) *reinterpret_cast<uint32_t*>(orow + e) = pack2<T>(acc[e] * inv, acc[e + 1] * inv);
  }
  cluster.sync();  // no CTA leaves (freeing its shared memory) while another still reads it
#else
  __trap();  // never launched: the host launches clusters only for code built from sm_90+ PTX
#endif
}

template <typename T, int D, int kStages, int kTileN, int kMinBlocks, bool kCluster>
__global__ void __launch_bounds__(128, kMinBlocks) tree_attn_mma_kernel(const TreeAttnParams p) {
  using Cfg = MmaAttnConfig<D, kStages, T, kTileN>;
  static_assert(kChunkAlign % kTileN == 0, "chunks must be whole tiles");
  constexpr int kBN = Cfg::kBN;
  constexpr int kChunks16 = D / 8;  // 16-byte chunks per K/V row
  constexpr int kLoadIters = kBN * kChunks16 / Cfg::kThreads;
  static_assert(kBN * kChunks16 % Cfg::kThreads == 0, "tile load must divide evenly");
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);  // [kStages][kBN][D], 16-byte chunk c of row r at c ^ (r & 7)
  T* sV = sK + kStages * kBN * D;

  // Clustered: the num_chunks CTAs of a row tile are one cluster (consecutive x), chunk = rank in it.
  const int tile = kCluster ? blockIdx.x / p.num_chunks : blockIdx.x % p.row_tiles;
  const int chunk = kCluster ? blockIdx.x % p.num_chunks : blockIdx.x / p.row_tiles;
  const int kvh = blockIdx.y;
  const int b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  pdl_wait();  // q, the cache and its lengths come from the kernels before
  pdl_launch_dependents();

  const SeqRange sr = seq_range(p, b);
  const int clen = chunk_len(sr.kv_end, p.num_chunks);
  const int kv_begin = chunk * clen;
  // An empty chunk: the combine kernel skips it; in a cluster it runs on (no tiles) to the cluster's barriers.
  if (!kCluster && p.num_chunks > 1 && kv_begin >= sr.kv_end) return;
  const int kv_stop = min(kv_begin + clen, sr.kv_end);
  const int ntiles = kv_stop > kv_begin ? ceil_div(kv_stop - kv_begin, kBN) : 0;

  const T* kbase = static_cast<const T*>(p.k) + b * p.k_sb + kvh * p.k_sh;
  const T* vbase = static_cast<const T*>(p.v) + b * p.v_sb + kvh * p.v_sh;

  // This thread's two rows: g and g + 8 of the warp's 16.
  const int warp_row0 = tile * Cfg::kRows + warp * 16;
  const bool warp_active = warp_row0 < p.rows;
  int node[2], head[2];
  bool row_ok[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = warp_row0 + g + 8 * i;
    row_ok[i] = r < p.rows;
    const int rc = row_ok[i] ? r : p.rows - 1;  // clamp: keeps mask reads in bounds, never written
    node[i] = rc / p.group;
    head[i] = kvh * p.group + rc % p.group;
  }

  // Q as A fragments: qa[ks][0] = (row g, cols 2t..2t+1), [1] = row g + 8, [2]/[3] = cols + 8.
  uint32_t qa[D / 16][4];
  {
    const T* qrow[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      qrow[i] = static_cast<const T*>(p.q) + b * p.q_sb + head[i] * p.q_sh + node[i] * p.q_sn;
    }
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const uint32_t* src = reinterpret_cast<const uint32_t*>(qrow[i] + ks * 16 + 2 * t);
        qa[ks][i] = row_ok[i] ? src[0] : 0u;
        qa[ks][2 + i] = row_ok[i] ? src[4] : 0u;  // + 8 elements
      }
    }
  }

  auto load_tile = [&](int it, int stage) {
    const int pos0 = kv_begin + it * kBN;
    T* dk = sK + stage * kBN * D;
    T* dv = sV + stage * kBN * D;
#pragma unroll
    for (int i = 0; i < kLoadIters; ++i) {
      const int idx = tid + i * Cfg::kThreads;
      const int row = idx / kChunks16;
      const int c = idx % kChunks16;
      const int pos = pos0 + row;
      const bool valid = pos < kv_stop;
      const int64_t src_pos = valid ? pos : 0;  // zero-filled, never read
      const int soff = row * D + ((c ^ (row & 7)) * 8);
      cp_async_16(smem_addr(dk + soff), kbase + src_pos * p.k_ss + c * 8, valid ? 16 : 0);
      cp_async_16(smem_addr(dv + soff), vbase + src_pos * p.v_ss + c * 8, valid ? 16 : 0);
    }
  };

  float o[D / 8][4];
#pragma unroll
  for (int nt = 0; nt < D / 8; ++nt) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.f;
  float m[2] = {neg_inf(), neg_inf()};
  float l[2] = {0.f, 0.f};

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < ntiles) load_tile(s, s);
    cp_async_commit();
  }

  for (int it = 0; it < ntiles; ++it) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // tile `it` is visible to all; the stage refilled below was consumed in iteration it-1
    {
      const int next = it + kStages - 1;
      if (next < ntiles) load_tile(next, next % kStages);
      cp_async_commit();
    }
    if (!warp_active) continue;

    const int stage = it % kStages;
    const T* tk = sK + stage * kBN * D;
    const T* tv = sV + stage * kBN * D;
    const int mat = lane >> 3;

    // S = Q K^T for 16 rows x 64 positions.
    float s[kBN / 8][4];
#pragma unroll
    for (int nt = 0; nt < kBN / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
#pragma unroll
      for (int np = 0; np < kBN / 16; ++np) {
        // matrices: (pos 0-7, d 0-7), (pos 0-7, d 8-15), (pos 8-15, d 0-7), (pos 8-15, d 8-15) of this block
        const int pos = np * 16 + (mat >> 1) * 8 + (lane & 7);
        const int c = ks * 2 + (mat & 1);
        uint32_t kb[4];
        ldmatrix_x4(kb, smem_addr(tk + pos * D + ((c ^ (pos & 7)) * 8)));
        mma_16816<T>(s[2 * np], qa[ks], kb[0], kb[1]);
        mma_16816<T>(s[2 * np + 1], qa[ks], kb[2], kb[3]);
      }
    }

    // Scale, mask, online softmax (rows g and g + 8; a row's 64 scores live in the 4 lanes of a quad).
    const int pos0 = kv_begin + it * kBN;
    const bool need_mask = pos0 + kBN > sr.cache_end;
#pragma unroll
    for (int nt = 0; nt < kBN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[nt][e] * p.scale_log2;
        if (need_mask && !visible(p, sr, kv_stop, pos0 + nt * 8 + 2 * t + (e & 1), node[e >> 1])) x = neg_inf();
        s[nt][e] = x;
      }
    }
    float m_use[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float mx = neg_inf();
#pragma unroll
      for (int nt = 0; nt < kBN / 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * i], s[nt][2 * i + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m[i], mx);
      m_use[i] = m_new == neg_inf() ? 0.f : m_new;  // nothing visible yet: keep exp2 away from -inf - -inf
      const float corr = exp2f(m[i] - m_use[i]);
      m[i] = m_new;
      l[i] *= corr;
#pragma unroll
      for (int nt = 0; nt < D / 8; ++nt) {
        o[nt][2 * i] *= corr;
        o[nt][2 * i + 1] *= corr;
      }
    }
#pragma unroll
    for (int nt = 0; nt < kBN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float pe = exp2f(s[nt][e] - m_use[e >> 1]);
        s[nt][e] = pe;
        l[e >> 1] += pe;
      }
    }

    // O += P V: P (16 x 64) straight from the S accumulators as A fragments, V via ldmatrix.trans.
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      uint32_t pa[4];
      pa[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
      pa[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
      pa[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pa[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        // matrices: (pos 0-7, d 0-7), (pos 8-15, d 0-7), (pos 0-7, d 8-15), (pos 8-15, d 8-15), transposed
        const int pos = kk * 16 + (mat & 1) * 8 + (lane & 7);
        const int c = dp * 2 + (mat >> 1);
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, smem_addr(tv + pos * D + ((c ^ (pos & 7)) * 8)));
        mma_16816<T>(o[2 * dp], pa, vb[0], vb[1]);
        mma_16816<T>(o[2 * dp + 1], pa, vb[2], vb[3]);
      }
    }
  }

  if constexpr (kCluster) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
      l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
    }
    cluster_combine<T, D>(p, smem_raw, tile, chunk, kvh, b, o, m, l);
    return;
  }
  if (!warp_active) return;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    if (!row_ok[i]) continue;
    const int64_t out_row = (static_cast<int64_t>(b) * p.N + node[i]) * p.Hq + head[i];  // [B, N, Hq]
    if (p.num_chunks == 1) {
      const float inv = l[i] > 0.f ? 1.f / l[i] : quiet_nan();  // a row that sees nothing: NaN, as the reference
      T* orow = static_cast<T*>(p.out) + out_row * D;
#pragma unroll
      for (int nt = 0; nt < D / 8; ++nt) {
        *reinterpret_cast<uint32_t*>(orow + nt * 8 + 2 * t) = pack2<T>(o[nt][2 * i] * inv, o[nt][2 * i + 1] * inv);
      }
    } else {
      const int64_t prow = static_cast<int64_t>(chunk) * p.B * p.N * p.Hq + out_row;
      float* po = p.part_o + prow * D;
#pragma unroll
      for (int nt = 0; nt < D / 8; ++nt) {
        *reinterpret_cast<float2*>(po + nt * 8 + 2 * t) = make_float2(o[nt][2 * i], o[nt][2 * i + 1]);
      }
      if (t == 0) p.part_ml[prow] = make_float2(m[i], l[i]);
    }
  }
}

// ================================================================ SIMT path (any dtype, D <= 32 * kDPL)
constexpr int kSimtRows = 16;     // query rows per CTA (4 per warp)
constexpr int kSimtBN = 32;       // KV positions per tile (one per lane)
constexpr int kSimtThreads = 128;

inline size_t simt_smem_bytes(int D) {
  return sizeof(float) * (size_t(kSimtRows) * D + size_t(kSimtBN) * (D + 1) + size_t(kSimtBN) * D +
                          size_t(kSimtRows) * kSimtBN);
}

template <typename T, int kDPL>
__global__ void __launch_bounds__(128) tree_attn_simt_kernel(const TreeAttnParams p) {
  pdl_wait();
  pdl_launch_dependents();
  constexpr int kRowsPerWarp = kSimtRows / 4;
  extern __shared__ float smem_f[];
  const int D = p.D;
  float* sQ = smem_f;                      // [16][D], pre-scaled
  float* sK = sQ + kSimtRows * D;          // [32][D + 1] (padded: lane j reads row j)
  float* sV = sK + kSimtBN * (D + 1);      // [32][D]
  float* sP = sV + kSimtBN * D;            // [16][32]

  const int tile = blockIdx.x % p.row_tiles;
  const int chunk = blockIdx.x / p.row_tiles;
  const int kvh = blockIdx.y;
  const int b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;

  const SeqRange sr = seq_range(p, b);
  const int clen = chunk_len(sr.kv_end, p.num_chunks);
  const int kv_begin = chunk * clen;
  if (p.num_chunks > 1 && kv_begin >= sr.kv_end) return;
  const int kv_stop = min(kv_begin + clen, sr.kv_end);
  const int ntiles = kv_stop > kv_begin ? ceil_div(kv_stop - kv_begin, kSimtBN) : 0;

  const T* kbase = static_cast<const T*>(p.k) + b * p.k_sb + kvh * p.k_sh;
  const T* vbase = static_cast<const T*>(p.v) + b * p.v_sb + kvh * p.v_sh;

  for (int idx = tid; idx < kSimtRows * D; idx += kSimtThreads) {
    const int rr = idx / D, d = idx % D;
    const int r = tile * kSimtRows + rr;
    float val = 0.f;
    if (r < p.rows) {
      const int n = r / p.group, h = kvh * p.group + r % p.group;
      val = to_float(static_cast<const T*>(p.q)[b * p.q_sb + h * p.q_sh + n * p.q_sn + d]) * p.scale_log2;
    }
    sQ[idx] = val;
  }

  int node[kRowsPerWarp], head[kRowsPerWarp];
  bool row_ok[kRowsPerWarp];
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int r = tile * kSimtRows + warp * kRowsPerWarp + rr;
    row_ok[rr] = r < p.rows;
    const int rc = row_ok[rr] ? r : p.rows - 1;
    node[rr] = rc / p.group;
    head[rr] = kvh * p.group + rc % p.group;
  }

  float m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][kDPL];
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    m[rr] = neg_inf();
    l[rr] = 0.f;
#pragma unroll
    for (int i = 0; i < kDPL; ++i) acc[rr][i] = 0.f;
  }

  for (int it = 0; it < ntiles; ++it) {
    const int pos0 = kv_begin + it * kSimtBN;
    __syncthreads();  // the previous tile is consumed (and sQ is written before the first)
    for (int idx = tid; idx < kSimtBN * D; idx += kSimtThreads) {
      const int j = idx / D, d = idx % D;
      const int pos = pos0 + j;
      const bool valid = pos < kv_stop;
      sK[j * (D + 1) + d] = valid ? to_float(kbase[pos * p.k_ss + d]) : 0.f;
      sV[j * D + d] = valid ? to_float(vbase[pos * p.v_ss + d]) : 0.f;
    }
    __syncthreads();

    const int pos = pos0 + lane;
    float s[kRowsPerWarp];
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) s[rr] = 0.f;
    const float* krow = sK + lane * (D + 1);
    const float* qw = sQ + warp * kRowsPerWarp * D;
    for (int d = 0; d < D; ++d) {
      const float kd = krow[d];
#pragma unroll
      for (int rr = 0; rr < kRowsPerWarp; ++rr) s[rr] = fmaf(qw[rr * D + d], kd, s[rr]);
    }
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      if (!visible(p, sr, kv_stop, pos, node[rr])) s[rr] = neg_inf();
      const float m_new = fmaxf(m[rr], warp_max(s[rr]));
      const float m_use = m_new == neg_inf() ? 0.f : m_new;
      const float corr = exp2f(m[rr] - m_use);
      m[rr] = m_new;
      const float pr = exp2f(s[rr] - m_use);
      l[rr] = l[rr] * corr + pr;  // per-lane partial sum, reduced at the end
#pragma unroll
      for (int i = 0; i < kDPL; ++i) acc[rr][i] *= corr;
      sP[(warp * kRowsPerWarp + rr) * kSimtBN + lane] = pr;
    }
    __syncwarp();
    const float* pw = sP + warp * kRowsPerWarp * kSimtBN;
    for (int j = 0; j < kSimtBN; ++j) {
      float vj[kDPL];
#pragma unroll
      for (int i = 0; i < kDPL; ++i) {
        const int d = lane + 32 * i;
        vj[i] = d < D ? sV[j * D + d] : 0.f;
      }
#pragma unroll
      for (int rr = 0; rr < kRowsPerWarp; ++rr) {
        const float pj = pw[rr * kSimtBN + j];
#pragma unroll
        for (int i = 0; i < kDPL; ++i) acc[rr][i] = fmaf(pj, vj[i], acc[rr][i]);
      }
    }
  }

#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const float lt = warp_sum(l[rr]);
    if (!row_ok[rr]) continue;
    const int64_t out_row = (static_cast<int64_t>(b) * p.N + node[rr]) * p.Hq + head[rr];
    if (p.num_chunks == 1) {
      const float inv = lt > 0.f ? 1.f / lt : quiet_nan();
      T* orow = static_cast<T*>(p.out) + out_row * D;
#pragma unroll
      for (int i = 0; i < kDPL; ++i) {
        const int d = lane + 32 * i;
        if (d < D) orow[d] = from_float<T>(acc[rr][i] * inv);
      }
    } else {
      const int64_t prow = static_cast<int64_t>(chunk) * p.B * p.N * p.Hq + out_row;
      float* po = p.part_o + prow * D;
#pragma unroll
      for (int i = 0; i < kDPL; ++i) {
        const int d = lane + 32 * i;
        if (d < D) po[d] = acc[rr][i];
      }
      if (lane == 0) p.part_ml[prow] = make_float2(m[rr], lt);
    }
  }
}

// ================================================================ combine of the chunks' partial rows
// One warp per output row (b, n, h): weights w_c = exp2(m_c - M) / sum_c exp2(m_c - M) l_c, out = sum_c w_c o_c.
// The (m, l) pairs are read once, one chunk per lane, and the weights go through shared memory, so the loads
// of the weighted sum are independent and overlap.
constexpr int kMaxChunks = 256;

template <typename T, bool kVec4>
__global__ void __launch_bounds__(128) tree_attn_combine_kernel(const TreeAttnParams p) {
  pdl_wait();  // the partial rows of the main kernel
  pdl_launch_dependents();
  constexpr int kPerLane = kMaxChunks / 32;
  __shared__ float s_w[4][kMaxChunks];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t rows_total = static_cast<int64_t>(p.B) * p.N * p.Hq;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 4 + warp;
  if (row >= rows_total) return;
  const int b = static_cast<int>(row / (static_cast<int64_t>(p.N) * p.Hq));
  const SeqRange sr = seq_range(p, b);
  const int used = sr.kv_end > 0 ? chunks_used(sr.kv_end, p.num_chunks) : 0;
  const int D = p.D;

  float2 ml[kPerLane];
  float M = neg_inf();
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int c = lane + 32 * i;
    ml[i] = c < used ? p.part_ml[c * rows_total + row] : make_float2(neg_inf(), 0.f);
    M = fmaxf(M, ml[i].x);
  }
  M = warp_max(M);
  const float Mu = M == neg_inf() ? 0.f : M;
  float L = 0.f;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int c = lane + 32 * i;
    const float w = exp2f(ml[i].x - Mu);
    L = fmaf(w, ml[i].y, L);
    if (c < used) s_w[warp][c] = w;
  }
  L = warp_sum(L);
  __syncwarp();
  const float inv = L > 0.f ? 1.f / L : quiet_nan();
  const float* w = s_w[warp];
  const float* po = p.part_o + row * D;
  const int64_t cstride = rows_total * D;
  T* orow = static_cast<T*>(p.out) + row * D;
  if constexpr (kVec4) {
    for (int d = 4 * lane; d < D; d += 128) {
      float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 8
      for (int c = 0; c < used; ++c) {
        const float4 x = *reinterpret_cast<const float4*>(po + c * cstride + d);
        acc.x = fmaf(w[c], x.x, acc.x);
        acc.y = fmaf(w[c], x.y, acc.y);
        acc.z = fmaf(w[c], x.z, acc.z);
        acc.w = fmaf(w[c], x.w, acc.w);
      }
      orow[d] = from_float<T>(acc.x * inv);
      orow[d + 1] = from_float<T>(acc.y * inv);
      orow[d + 2] = from_float<T>(acc.z * inv);
      orow[d + 3] = from_float<T>(acc.w * inv);
    }
  } else {
    for (int d = lane; d < D; d += 32) {
      float acc = 0.f;
#pragma unroll 8
      for (int c = 0; c < used; ++c) acc = fmaf(w[c], po[c * cstride + d], acc);
      orow[d] = from_float<T>(acc * inv);
    }
  }
}

// ================================================================ launchers
// The tensor-core configuration: 64-position tiles, 3 stages (96 KB at D = 128), 2 CTAs per multiprocessor.
// (Measured on the H200: 3 CTAs with 2 stages or 32-position tiles, or 4 with 128 registers, were slower.)
template <typename T, int D>
struct MmaAttnKernel {
  static constexpr int kStages = 3, kTileN = 64, kMinBlocks = 2;
  using Cfg = MmaAttnConfig<D, kStages, T, kTileN>;
  static constexpr auto kernel = tree_attn_mma_kernel<T, D, kStages, kTileN, kMinBlocks, false>;
  static constexpr auto clustered = tree_attn_mma_kernel<T, D, kStages, kTileN, kMinBlocks, true>;
  static_assert(Cfg::kRows == 64 && 64 * D * sizeof(float) + 64 * sizeof(float2) <= Cfg::kSmemBytes,
                "the cluster combine's rows must fit in the K/V ring");
  static cudaError_t prepare() {
    if (Cfg::kSmemBytes <= 48 * 1024) return cudaSuccess;
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(Cfg::kSmemBytes));
    if (err != cudaSuccess) return err;
    return cudaFuncSetAttribute(clustered, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                static_cast<int>(Cfg::kSmemBytes));
  }
};

// Whether the chunks of a launch of num_chunks chunks can merge inside a cluster (no combine kernel): sm_90+ code,
// 2-8 chunks, and the device can schedule such a cluster (asked once per device and size, then kept: a failed
// launch inside a CUDA-graph capture could not be retried the other way).
template <typename T, int D>
bool tree_attn_mma_clusters(int num_chunks) {
  using K = MmaAttnKernel<T, D>;
  if (num_chunks < 2 || num_chunks > kMaxClusterChunks || !code_from_sm90(reinterpret_cast<const void*>(K::clustered))) {
    return false;
  }
  static std::array<std::array<std::atomic<int>, 64>, kMaxClusterChunks + 1> slots{};  // per size, per device
  return per_device_answer(slots[num_chunks], [&] {
    cudaLaunchConfig_t cfg{};
    cfg.gridDim = dim3(num_chunks);
    cfg.blockDim = dim3(K::Cfg::kThreads);
    cfg.dynamicSmemBytes = K::Cfg::kSmemBytes;
    cudaLaunchAttribute attr[1] = {cluster_attribute(static_cast<unsigned>(num_chunks))};
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    int clusters = 0;
    const bool ok = K::prepare() == cudaSuccess &&
                    cudaOccupancyMaxActiveClusters(&clusters, K::clustered, &cfg) == cudaSuccess && clusters > 0;
    if (!ok) (void)cudaGetLastError();  // a refused query leaves no sticky error behind
    return ok;
  });
}

// CTAs of the launch that fit on one multiprocessor at once (for the chunk choice).
template <typename T, int D>
cudaError_t tree_attn_mma_per_sm(int* per_sm) {
  using K = MmaAttnKernel<T, D>;
  cudaError_t err = K::prepare();
  if (err != cudaSuccess) return err;
  return occupancy_per_sm(reinterpret_cast<const void*>(K::kernel), K::Cfg::kThreads, K::Cfg::kSmemBytes, per_sm);
}

template <typename T, int kDPL>
cudaError_t tree_attn_simt_per_sm(int* per_sm, int D) {
  auto kernel = tree_attn_simt_kernel<T, kDPL>;
  const size_t smem = simt_smem_bytes(D);
  if (smem > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  return occupancy_per_sm(reinterpret_cast<const void*>(kernel), kSimtThreads, smem, per_sm);
}

// cluster: tree_attn_mma_clusters(p.num_chunks) said yes; the output rows are then final (no combine launch).
template <typename T, int D>
cudaError_t launch_tree_attn_mma(const TreeAttnParams& p, cudaStream_t stream, bool pdl, bool cluster) {
  using K = MmaAttnKernel<T, D>;
  cudaError_t err = K::prepare();
  if (err != cudaSuccess) return err;
  const dim3 grid(p.row_tiles * p.num_chunks, p.Hkv, p.B);
  if (cluster) {
    return launch_kernel_in_clusters(K::clustered, grid, dim3(K::Cfg::kThreads), K::Cfg::kSmemBytes, stream, pdl,
                                     static_cast<unsigned>(p.num_chunks), p);
  }
  return launch_kernel(K::kernel, grid, dim3(K::Cfg::kThreads), K::Cfg::kSmemBytes, stream, pdl, p);
}

template <typename T, int kDPL>
cudaError_t launch_tree_attn_simt(const TreeAttnParams& p, cudaStream_t stream, bool pdl) {
  auto kernel = tree_attn_simt_kernel<T, kDPL>;
  const size_t smem = simt_smem_bytes(p.D);
  cudaError_t err = cudaSuccess;
  if (smem > 48 * 1024) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(p.row_tiles * p.num_chunks, p.Hkv, p.B);
  return launch_kernel(kernel, grid, dim3(kSimtThreads), smem, stream, pdl, p);
}

template <typename T>
cudaError_t launch_tree_attn_combine(const TreeAttnParams& p, cudaStream_t stream, bool pdl) {
  const int64_t rows_total = static_cast<int64_t>(p.B) * p.N * p.Hq;
  const int64_t blocks = ceil_div64(rows_total, 4);
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const auto kernel = p.D % 4 == 0 ? tree_attn_combine_kernel<T, true> : tree_attn_combine_kernel<T, false>;
  return launch_kernel(kernel, dim3(static_cast<unsigned>(blocks)), dim3(128), 0, stream, pdl, p);
}

}  // namespace hydra_fast::kernels

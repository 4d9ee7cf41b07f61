// rope_kv_write: one CTA per token (b, n), handling all its q, k and v heads.
//
// A head is served by a group of `group` lanes (a power of two <= 32; groups never straddle a warp). Lane l of a
// group owns vectors l, l + group, ... (kPer at most) of kVec values in the head's first half and the matching
// vectors in the second half, so rotate_half's partners (i, i + D/2) sit in one thread. cos/sin and the q/k norm
// weights at those positions are loaded once per thread and reused for every head. Per-head RMSNorm (Qwen3)
// sums squares over the group with xor shuffles; every lane takes part in every round, active or not, so the
// shuffles always see a converged warp. q goes to the output [B, N, Hq, D]; k and v go to
// cache[layer, b, kv head, cache_lens[b] + n] when that slot is in [0, S), else nowhere. Rounding as
// reference.rope_kv_write (layer_math.cuh).
#pragma once

#include "layer_math.cuh"

namespace hydra_fast::kernels {

struct RopeKvParams {
  const void* qkv;             // [B, N, (Hq + 2 Hkv) D], strides qkv_sb, qkv_sn (elements), last dim contiguous
  const void* cos;             // [B, N, D]
  const void* sin;             // [B, N, D]
  const void* q_norm;          // [D] or null
  const void* k_norm;          // [D] or null
  void* q_out;                 // [B, N, Hq, D] contiguous
  void* cache[2];              // k, v: the layer's [B, Hkv, S, D] (layer offset applied)
  int64_t cache_stride[2][3];  // elements: b, head, slot
  const int32_t* lens;         // [B]
  int64_t lens_stride;
  int64_t qkv_sb, qkv_sn, cos_sb, cos_sn, sin_sb, sin_sn;
  int B, N, Hq, Hkv, D, S;
  int group;                   // lanes per head
  float eps;
};

constexpr int kRopeMaxThreads = 512;

template <typename T, int kVec, int kPer>
__global__ void __launch_bounds__(kRopeMaxThreads) rope_kv_write_kernel(const RopeKvParams p) {
  pdl_wait();  // the projections and the cache lengths come from the kernels before
  pdl_launch_dependents();
  const int token = blockIdx.x;
  const int b = token / p.N, n = token % p.N;
  const int half = p.D / 2, nvec = half / kVec;  // vectors per half
  const int lane = threadIdx.x % p.group, group_id = threadIdx.x / p.group, groups = blockDim.x / p.group;
  const int64_t slot = static_cast<int64_t>(p.lens[b * p.lens_stride]) + n;
  const bool in_cache = slot >= 0 && slot < p.S;

  // This lane's positions: first-half vector j = lane + k * group covers [j kVec, (j + 1) kVec), and its partner
  // half + the same.
  using V = Vec<T, kVec>;
  V c0[kPer], c1[kPer], s0[kPer], s1[kPer], qw0[kPer], qw1[kPer], kw0[kPer], kw1[kPer];  // packed: few registers
  const T* cos = static_cast<const T*>(p.cos) + b * p.cos_sb + n * p.cos_sn;
  const T* sin = static_cast<const T*>(p.sin) + b * p.sin_sb + n * p.sin_sn;
  const T* qn = static_cast<const T*>(p.q_norm);
  const T* kn = static_cast<const T*>(p.k_norm);
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    const int j = lane + k * p.group, e = j * kVec;
    if (j < nvec) {
      c0[k] = load_raw<T, kVec>(cos + e);
      c1[k] = load_raw<T, kVec>(cos + half + e);
      s0[k] = load_raw<T, kVec>(sin + e);
      s1[k] = load_raw<T, kVec>(sin + half + e);
      if (qn) {
        qw0[k] = load_raw<T, kVec>(qn + e);
        qw1[k] = load_raw<T, kVec>(qn + half + e);
      }
      if (kn) {
        kw0[k] = load_raw<T, kVec>(kn + e);
        kw1[k] = load_raw<T, kVec>(kn + half + e);
      }
    }
  }

  const T* src_token = static_cast<const T*>(p.qkv) + b * p.qkv_sb + n * p.qkv_sn;
  const int heads = p.Hq + 2 * p.Hkv;
  for (int h0 = 0; h0 < heads; h0 += groups) {  // the same rounds for every thread of the CTA
    const int h = h0 + group_id;
    const int which = h < p.Hq ? 0 : h < p.Hq + p.Hkv ? 1 : 2;  // q, k, v
    const bool active = h < heads && (which == 0 || in_cache);
    float a[kPer][kVec], z[kPer][kVec];  // first-half and second-half values
    float ss = 0.0f;
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      const int j = lane + k * p.group;
      if (active && j < nvec) {
        const T* src = src_token + static_cast<int64_t>(h) * p.D + j * kVec;
        load_vec<T, kVec>(src, a[k]);
        load_vec<T, kVec>(src + half, z[k]);
#pragma unroll
        for (int i = 0; i < kVec; ++i) ss = fmaf(z[k][i], z[k][i], fmaf(a[k][i], a[k][i], ss));
      }
    }
    const bool has_norm = (which == 0 && qn) || (which == 1 && kn);
    if (qn || kn) {  // uniform: every lane shuffles when any norm is given
      for (int o = p.group / 2; o > 0; o /= 2) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    }
    if (!active) continue;
    if (has_norm) {
      const float r = rms_inv_from_sum(ss, p.D, p.eps);
#pragma unroll
      for (int k = 0; k < kPer; ++k) {
#pragma unroll
        for (int i = 0; i < kVec; ++i) {
          a[k][i] = rms_scale<T>(a[k][i], r, to_float(which == 0 ? qw0[k].v[i] : kw0[k].v[i]));
          z[k][i] = rms_scale<T>(z[k][i], r, to_float(which == 0 ? qw1[k].v[i] : kw1[k].v[i]));
        }
      }
    }
    T* dst;
    if (which == 0) {
      dst = static_cast<T*>(p.q_out) + (static_cast<int64_t>(token) * p.Hq + h) * p.D;
    } else {
      const int c = which - 1;
      const int kvh = h - p.Hq - (which == 2 ? p.Hkv : 0);
      dst = static_cast<T*>(p.cache[c]) + b * p.cache_stride[c][0] + kvh * p.cache_stride[c][1] +
            slot * p.cache_stride[c][2];
    }
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      const int j = lane + k * p.group;
      if (j >= nvec) continue;
      if (which < 2) {
#pragma unroll
        for (int i = 0; i < kVec; ++i) {
          const float x0 = a[k][i], x1 = z[k][i];
          a[k][i] = add_t<T>(mul_t<T>(x0, to_float(c0[k].v[i])), mul_t<T>(-x1, to_float(s0[k].v[i])));
          z[k][i] = add_t<T>(mul_t<T>(x1, to_float(c1[k].v[i])), mul_t<T>(x0, to_float(s1[k].v[i])));
        }
      }
      store_vec<T, kVec>(dst + j * kVec, a[k]);
      store_vec<T, kVec>(dst + half + j * kVec, z[k]);
    }
  }
}

// Lanes per head: the smallest power of two >= the head's vectors per half, at most 32.
inline int rope_group(int vectors_per_half) {
  int g = 1;
  while (g < vectors_per_half && g < 32) g *= 2;
  return g;
}

// Vectors per lane per half with `group` lanes: 1, 2, 4 or 8.
inline int rope_per_lane(int vectors_per_half, int group) { return (vectors_per_half + group - 1) / group; }

template <typename T, int kVec, int kPer>
cudaError_t launch_rope_kv_write(const RopeKvParams& p, cudaStream_t stream, bool pdl) {
  const int64_t tokens = static_cast<int64_t>(p.B) * p.N;
  if (tokens == 0) return cudaSuccess;
  if (tokens > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const int64_t lanes = static_cast<int64_t>(p.Hq + 2 * p.Hkv) * p.group;
  const int threads = static_cast<int>(lanes >= kRopeMaxThreads ? kRopeMaxThreads : ((lanes + 31) / 32) * 32);
  return launch_kernel(rope_kv_write_kernel<T, kVec, kPer>, dim3(static_cast<unsigned>(tokens)), dim3(threads), 0,
                       stream, pdl, p);
}

}  // namespace hydra_fast::kernels

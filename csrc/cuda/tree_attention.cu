// CUDA glue of tree_attention: checks, device guard, current stream, path and chunk choice, launch.
// See kernels/tree_attention.cuh for the kernels.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>

#include "checks.h"
#include "glue.h"
#include "kernels/tree_attention.cuh"
#include "static_switch.h"

namespace hydra_fast {
namespace {

// KV chunks per (row tile, kv head, b): as many as fill one wave of the CTAs that are resident at once (a
// second, mostly empty wave would double the time), but chunks of at least kMinChunk positions so that the
// fp32 partial rows stay small next to the K/V bytes they summarise.
int choose_chunks(int64_t base_ctas, int64_t S, int sms, int per_sm) {
  constexpr int64_t kMinChunk = 128;
  const int64_t want = std::max<int64_t>(1, (int64_t(per_sm) * sms) / base_ctas);
  const int64_t by_len = std::max<int64_t>(1, (S + kMinChunk - 1) / kMinChunk);
  return static_cast<int>(std::min<int64_t>({want, by_len, int64_t(kernels::kMaxChunks)}));
}

// The fast path's kernels for 16-bit types (float never takes it).
template <typename T>
cudaError_t launch_mma(const kernels::TreeAttnParams& p, cudaStream_t stream, bool pdl, bool cluster) {
  if constexpr (sizeof(T) == 2) {
    return HF_HEADDIM_SWITCH(p.D, kD, [&] { return kernels::launch_tree_attn_mma<T, kD>(p, stream, pdl, cluster); });
  } else {
    return cudaErrorInvalidValue;
  }
}

// Whether the fast path's chunks merge inside clusters (sm_90+ code, 2-8 chunks, cuda_glue::attn_cluster_allowed);
// the caller also asks for one row tile (see tree_attention.cuh).
template <typename T>
bool mma_clusters(int D, int num_chunks) {
  if constexpr (sizeof(T) == 2) {
    return cuda_glue::attn_cluster_allowed() &&
           HF_HEADDIM_SWITCH(D, kD, [&] { return kernels::tree_attn_mma_clusters<T, kD>(num_chunks); });
  } else {
    return false;
  }
}

template <typename T>
cudaError_t mma_per_sm(int D, int* per_sm) {
  if constexpr (sizeof(T) == 2) {
    return HF_HEADDIM_SWITCH(D, kD, [&] { return kernels::tree_attn_mma_per_sm<T, kD>(per_sm); });
  } else {
    return cudaErrorInvalidValue;
  }
}

at::Tensor tree_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                               const at::Tensor& cache_lens, const at::Tensor& tree_mask, double scale) {
  check_tree_attention(q, k_cache, v_cache, cache_lens, tree_mask, scale);
  TORCH_CHECK(q.is_cuda(), "hydra_fast.tree_attention: q must be a CUDA tensor");
  const int64_t B = q.size(0), Hq = q.size(1), N = q.size(2), D = q.size(3);
  const int64_t Hkv = k_cache.size(1), S = k_cache.size(2);
  at::Tensor out = at::empty({B, N, Hq, D}, q.options());  // [B, N, Hq, D]
  if (out.numel() == 0) return out;
  TORCH_CHECK(B <= 65535 && Hkv <= 65535, "hydra_fast.tree_attention: B and Hkv must be <= 65535 on CUDA, got B = ",
              B, ", Hkv = ", Hkv);
  TORCH_CHECK(S < (int64_t(1) << 30) && N * (Hq / Hkv) < (int64_t(1) << 30),
              "hydra_fast.tree_attention: S and N * Hq / Hkv must be < 2^30 on CUDA");

  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int sms = cuda_glue::sm_count(q.get_device());
  const bool pdl = cuda_glue::pdl_allowed();

  kernels::TreeAttnParams p{};
  p.q = q.const_data_ptr();
  p.k = k_cache.const_data_ptr();
  p.v = v_cache.const_data_ptr();
  p.out = out.mutable_data_ptr();
  p.lens = cache_lens.const_data_ptr<int32_t>();
  p.lens_stride = cache_lens.stride(0);
  p.mask = tree_mask.const_data_ptr<bool>();
  p.mask_sb = tree_mask.dim() == 3 ? tree_mask.stride(0) : 0;  // [B, N, N] or one [N, N] for all
  p.mask_s0 = tree_mask.stride(-2);
  p.mask_s1 = tree_mask.stride(-1);
  p.q_sb = q.stride(0);
  p.q_sh = q.stride(1);
  p.q_sn = q.stride(2);
  p.k_sb = k_cache.stride(0);
  p.k_sh = k_cache.stride(1);
  p.k_ss = k_cache.stride(2);
  p.v_sb = v_cache.stride(0);
  p.v_sh = v_cache.stride(1);
  p.v_ss = v_cache.stride(2);
  p.B = static_cast<int>(B);
  p.Hq = static_cast<int>(Hq);
  p.Hkv = static_cast<int>(Hkv);
  p.group = static_cast<int>(Hq / Hkv);
  p.N = static_cast<int>(N);
  p.S = static_cast<int>(S);
  p.D = static_cast<int>(D);
  p.rows = static_cast<int>(N * (Hq / Hkv));
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);

  // Tensor cores for 16-bit inputs with D 64 or 128, K/V rows in 16-byte vectors, Q in 4-byte pairs.
  const bool half_type = q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16;
  const bool q_pairs = cuda_glue::ptr_aligned(q.const_data_ptr(), 4) && q.stride(0) % 2 == 0 &&
                       q.stride(1) % 2 == 0 && q.stride(2) % 2 == 0;
  const bool fast = half_type && (D == 64 || D == 128) && q_pairs && cuda_glue::rows_vector_aligned(k_cache, 8) &&
                    cuda_glue::rows_vector_aligned(v_cache, 8);
  const int rows_per_cta = fast ? 64 : kernels::kSimtRows;
  p.row_tiles = static_cast<int>((p.rows + rows_per_cta - 1) / rows_per_cta);
  const int dpl = static_cast<int>((D + 31) / 32);
  int per_sm = 0;
  cudaError_t err = HF_DTYPE_SWITCH(q.scalar_type(), T, [&] {
    return fast ? mma_per_sm<T>(p.D, &per_sm)
                : HF_POW2_UPTO8_SWITCH(dpl, kDPL, [&] { return kernels::tree_attn_simt_per_sm<T, kDPL>(&per_sm, p.D); });
  });
  TORCH_CHECK(err == cudaSuccess, "hydra_fast.tree_attention: occupancy query failed: ", cudaGetErrorString(err));
  p.num_chunks = choose_chunks(B * Hkv * p.row_tiles, S, sms, std::max(per_sm, 1));
  TORCH_CHECK(static_cast<int64_t>(p.row_tiles) * p.num_chunks <= 0x7fffffff,
              "hydra_fast.tree_attention: too many query rows for one launch");

  bool cluster = false;
  if (fast && p.row_tiles == 1) {
    HF_DTYPE_SWITCH(q.scalar_type(), T, [&] { cluster = mma_clusters<T>(p.D, p.num_chunks); });
  }
  at::Tensor part_o, part_ml;
  if (p.num_chunks > 1 && !cluster) {
    const auto f32 = q.options().dtype(at::kFloat);
    part_o = at::empty({p.num_chunks, B, N, Hq, D}, f32);    // [chunks, B, N, Hq, D]
    part_ml = at::empty({p.num_chunks, B, N, Hq, 2}, f32);   // [chunks, B, N, Hq, (max, sum)]
    p.part_o = part_o.mutable_data_ptr<float>();
    p.part_ml = reinterpret_cast<float2*>(part_ml.mutable_data_ptr<float>());
  }

  HF_DTYPE_SWITCH(q.scalar_type(), T, [&] {
    if (fast) {
      err = launch_mma<T>(p, stream, pdl, cluster);
    } else {
      err = HF_POW2_UPTO8_SWITCH(dpl, kDPL, [&] { return kernels::launch_tree_attn_simt<T, kDPL>(p, stream, pdl); });
    }
    if (err == cudaSuccess && p.num_chunks > 1 && !cluster) err = kernels::launch_tree_attn_combine<T>(p, stream, pdl);
  });
  TORCH_CHECK(err == cudaSuccess, "hydra_fast.tree_attention: CUDA launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(hydra_fast, CUDA, m) { m.impl("tree_attention", &tree_attention_cuda); }

}  // namespace hydra_fast

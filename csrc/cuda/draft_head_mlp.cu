// CUDA glue of draft_head_mlp: checks, device guard, current stream, per-block path and split choice. Up to 8
// rows (fp16/bf16, aligned, d % 32 == 0): one fused launch per block (embedding gather, GEMM, bias, SiLU and
// residual). Otherwise: gather once, cuBLAS GEMMs (at::addmm), one SiLU + residual launch. See
// kernels/draft_head_mlp.cuh.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "checks.h"
#include "glue.h"
#include "kernels/draft_head_mlp.cuh"
#include "static_switch.h"

namespace hydra_fast {
namespace {

// Rows readable as 16-byte vectors: stride 1 in the last dim, row stride and pointer 16-byte aligned.
bool rows16(const at::Tensor& t) {
  const int64_t vec = 16 / t.element_size();
  return t.stride(1) == 1 && (t.size(0) == 1 || t.stride(0) % vec == 0) &&
         cuda_glue::ptr_aligned(t.const_data_ptr(), 16);
}

// The fused weight-streaming kernel serves up to this many rows; above it cuBLAS's GEMMs are faster (H200).
constexpr int64_t kFusedMaxRows = 8;

struct SplitPlan {
  int ksplit, split_len;
};

// K splits: as many as fill one wave of the CTAs resident at once (`slots`; a partial second wave would
// double the time), but fp32 partial sums no larger than half the weight bytes or 4 MB (K / (4 Rp) splits,
// or more for small layers), and at least 2 slabs of 32 per split.
SplitPlan plan_splits(int64_t K, int64_t d, int64_t Rp, int64_t row_groups, int64_t slots) {
  const int64_t slabs = K / 32;
  const int64_t ftiles = (d + kernels::kMlpFeatures - 1) / kernels::kMlpFeatures;
  const int64_t base = ftiles * row_groups;
  int64_t ks = std::max<int64_t>(1, slots / base);
  const int64_t part_cap = std::max<int64_t>(K / (4 * Rp), (int64_t(4) << 20) / (8 * Rp * d));
  ks = std::min<int64_t>(ks, std::max<int64_t>(1, part_cap));
  ks = std::min<int64_t>(ks, std::max<int64_t>(1, slabs / 2));
  ks = std::clamp<int64_t>(ks, 1, 1024);
  const int64_t per = (slabs + ks - 1) / ks;  // slabs per split
  ks = (slabs + per - 1) / per;               // no empty splits
  return {static_cast<int>(ks), static_cast<int>(per * 32)};
}

// CTAs of the tensor-core kernel resident per multiprocessor.
template <typename T, bool kHasRes>
int fast_per_sm(int R) {
  if constexpr (sizeof(T) == 2) {
    const int nt = kernels::mlp_row_tile(R) / 8;
    int n = 0;
    const cudaError_t err = HF_POW2_UPTO8_SWITCH(nt, kNT, [&] {
      return cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernels::mlp_block_mma_kernel<T, kNT, kHasRes>,
                                                           kernels::kMlpWarps * 32, 0);
    });
    TORCH_CHECK(err == cudaSuccess, "hydra_fast.draft_head_mlp: occupancy query failed: ", cudaGetErrorString(err));
    return std::max(n, 1);
  } else {
    return 1;
  }
}

template <typename T, bool kHasRes>
cudaError_t launch_fast(const kernels::MlpBlockParams& p, cudaStream_t stream, bool pdl) {
  if constexpr (sizeof(T) == 2) {
    const int nt = kernels::mlp_row_tile(p.R) / 8;
    return HF_POW2_UPTO8_SWITCH(nt, kNT,
                                [&] { return kernels::launch_mlp_block_mma<T, kNT, kHasRes>(p, stream, pdl); });
  } else {
    return cudaErrorInvalidValue;  // not reached: the fast path is chosen for 16-bit types only
  }
}

at::Tensor draft_head_mlp_cuda(const at::Tensor& hidden, const at::Tensor& path_tokens, const at::Tensor& embed,
                               at::TensorList weights, at::TensorList biases,
                               const std::optional<at::Tensor>& res_weight, const std::optional<at::Tensor>& res_bias) {
  check_draft_head_mlp(hidden, path_tokens, embed, weights, biases, res_weight, res_bias);
  TORCH_CHECK(hidden.is_cuda(), "hydra_fast.draft_head_mlp: hidden must be a CUDA tensor");
  const int64_t R = hidden.size(0), d = hidden.size(1), k = path_tokens.size(1);
  at::Tensor out = at::empty({R, d}, hidden.options());  // [R, d]
  if (R == 0 || d == 0) return out;
  TORCH_CHECK((k + 1) * d < (int64_t(1) << 31) && R < (int64_t(1) << 20),
              "hydra_fast.draft_head_mlp: (k + 1) * d must be < 2^31 and R < 2^20 on CUDA");

  const c10::cuda::CUDAGuard guard(hidden.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool pdl = cuda_glue::pdl_allowed();
  const int sms = cuda_glue::sm_count(hidden.get_device());
  const size_t nblocks = weights.size();
  const bool half_type = hidden.scalar_type() == at::kHalf || hidden.scalar_type() == at::kBFloat16;

  // Plan every block first, so that one zeroed counter buffer and one partial-sum buffer serve them all.
  const int RG = kernels::mlp_row_tile(static_cast<int>(R));
  const int64_t row_groups = (R + RG - 1) / RG;
  const int64_t Rp = row_groups * RG;
  const int64_t ftiles = (d + kernels::kMlpFeatures - 1) / kernels::kMlpFeatures;
  std::vector<kernels::MlpBlockParams> plans(nblocks);
  std::vector<bool> fast(nblocks);
  int64_t counters_needed = 0, part_needed = 0;
  std::vector<at::Tensor> outs(nblocks);
  for (size_t i = 0; i < nblocks; ++i) {
    const bool first = i == 0;
    const bool has_res = first && res_weight.has_value();
    const at::Tensor& x = first ? hidden : outs[i - 1];
    outs[i] = i + 1 == nblocks ? out : at::empty({R, d}, hidden.options());  // [R, d]
    kernels::MlpBlockParams& p = plans[i];
    p = {};
    p.x = x.const_data_ptr();
    p.xs0 = x.stride(0);
    p.xs1 = x.stride(1);
    p.k = first ? static_cast<int>(k) : 0;
    p.embed = embed.const_data_ptr();
    p.es0 = embed.stride(0);
    p.V = embed.size(0);
    p.tokens = path_tokens.const_data_ptr<int64_t>();
    p.ts0 = path_tokens.stride(0);
    p.ts1 = path_tokens.stride(1);
    p.w = weights[i].const_data_ptr();
    p.ws0 = weights[i].stride(0);
    p.ws1 = weights[i].stride(1);
    p.bias = biases[i].const_data_ptr();
    p.bs = biases[i].stride(0);
    if (has_res) {
      p.wr = res_weight->const_data_ptr();
      p.wrs0 = res_weight->stride(0);
      p.wrs1 = res_weight->stride(1);
      if (res_bias.has_value()) {
        p.rbias = res_bias->const_data_ptr();
        p.rbs = res_bias->stride(0);
      }
    }
    p.out = outs[i].mutable_data_ptr();
    p.R = static_cast<int>(R);
    p.d = static_cast<int>(d);
    p.K = static_cast<int>((p.k + 1) * d);
    p.Rp = static_cast<int>(Rp);
    p.ksplit = 1;
    p.split_len = p.K;
    fast[i] = R <= kFusedMaxRows && half_type && d % 32 == 0 && rows16(x) && (p.k == 0 || rows16(embed)) &&
              rows16(weights[i]) && (!has_res || rows16(*res_weight));
    if (fast[i]) {
      const int per_sm = HF_DTYPE_SWITCH(hidden.scalar_type(), T, [&] {
        return HF_BOOL_SWITCH(has_res, kHasRes, [&] { return fast_per_sm<T, kHasRes>(static_cast<int>(R)); });
      });
      const SplitPlan sp = plan_splits(p.K, d, Rp, row_groups, static_cast<int64_t>(per_sm) * sms);
      p.ksplit = sp.ksplit;
      p.split_len = sp.split_len;
      if (p.ksplit > 1) {
        counters_needed += ftiles * row_groups;
        part_needed = std::max<int64_t>(part_needed, (has_res ? 2 : 1) * p.ksplit * Rp * d);
      }
    }
  }
  at::Tensor counters, part;
  if (counters_needed > 0) {
    counters = at::zeros({counters_needed}, hidden.options().dtype(at::kInt));
    part = at::empty({part_needed}, hidden.options().dtype(at::kFloat));  // [(2,) ksplit, Rp, d]
  }

  int64_t counter_off = 0;
  for (size_t i = 0; i < nblocks; ++i) {
    kernels::MlpBlockParams& p = plans[i];
    const bool has_res = p.wr != nullptr;
    cudaError_t err = cudaSuccess;
    if (fast[i]) {
      if (p.ksplit > 1) {
        p.counters = counters.mutable_data_ptr<int>() + counter_off;
        p.part = part.mutable_data_ptr<float>();
        counter_off += ftiles * row_groups;
      }
      HF_DTYPE_SWITCH(hidden.scalar_type(), T, [&] {
        err = HF_BOOL_SWITCH(has_res, kHasRes, [&] { return launch_fast<T, kHasRes>(p, stream, pdl); });
      });
    } else {
      // GEMM path: x gathered once if needed ([R, K]), y = W x + b and res = Wr x + br through cuBLAS
      // (fp32 accumulation, outputs rounded to the input dtype as in the reference), then SiLU + residual.
      const bool first = i == 0;
      at::Tensor x = first ? hidden : outs[i - 1];
      if (first && k > 0) {
        at::Tensor gathered = at::empty({R, (k + 1) * d}, hidden.options());  // [R, (k+1)d]
        HF_DTYPE_SWITCH(hidden.scalar_type(), T, [&] {
          err = kernels::launch_mlp_gather<T>(p, static_cast<T*>(gathered.mutable_data_ptr()), stream);
        });
        TORCH_CHECK(err == cudaSuccess, "hydra_fast.draft_head_mlp: CUDA launch failed: ", cudaGetErrorString(err));
        x = gathered;
      }
      const at::Tensor y = at::addmm(biases[i], x, weights[i].t());  // [R, d]
      at::Tensor res = x;                                             // [R, d] (k == 0 when no residual weight)
      if (has_res) {
        res = res_bias.has_value() ? at::addmm(*res_bias, x, res_weight->t()) : at::mm(x, res_weight->t());
      }
      HF_DTYPE_SWITCH(hidden.scalar_type(), T, [&] {
        // (void* accessors: libtorch instantiates the typed ones for at::Half / at::BFloat16, not CUDA's types)
        err = kernels::launch_mlp_silu_residual<T>(static_cast<const T*>(y.const_data_ptr()),
                                                   static_cast<const T*>(res.const_data_ptr()), res.stride(0),
                                                   res.stride(1), static_cast<T*>(outs[i].mutable_data_ptr()), p.R,
                                                   p.d, stream);
      });
    }
    TORCH_CHECK(err == cudaSuccess, "hydra_fast.draft_head_mlp: CUDA launch failed: ", cudaGetErrorString(err));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(hydra_fast, CUDA, m) { m.impl("draft_head_mlp", &draft_head_mlp_cuda); }

}  // namespace hydra_fast

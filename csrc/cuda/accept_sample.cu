// CUDA glue of accept_sample: checks, device guard, current stream, launch. See kernels/accept_sample.cuh.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "checks.h"
#include "glue.h"
#include "kernels/accept_sample.cuh"

namespace hydra_fast {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> accept_sample_cuda(const at::Tensor& probs, const at::Tensor& candidates,
                                                                  const at::Tensor& first_child,
                                                                  const at::Tensor& next_sibling,
                                                                  const at::Tensor& uniform, int64_t max_depth) {
  check_accept_sample(probs, candidates, first_child, next_sibling, uniform, max_depth);
  TORCH_CHECK(probs.is_cuda(), "hydra_fast.accept_sample: probs must be a CUDA tensor");
  const int64_t B = probs.size(0), N = probs.size(1), L = max_depth + 1;
  const auto i64 = probs.options().dtype(at::kLong);
  at::Tensor accept_len = at::empty({B}, i64);         // [B]
  at::Tensor out_tokens = at::empty({B, L}, i64);      // [B, L]
  at::Tensor accepted_nodes = at::empty({B, L}, i64);  // [B, L]
  if (B == 0) return {accept_len, out_tokens, accepted_nodes};
  TORCH_CHECK(B <= 0x7fffffff, "hydra_fast.accept_sample: B must be < 2^31 on CUDA, got ", B);
  TORCH_CHECK(kernels::accept_sample_smem_bytes(N, L) <= 160 * 1024, "hydra_fast.accept_sample: N must be <= ",
              160 * 1024 / 16, " on CUDA, got ", N);

  const c10::cuda::CUDAGuard guard(probs.device());
  kernels::AcceptSampleParams p{};
  p.probs = probs.const_data_ptr<float>();
  p.ps0 = probs.stride(0);
  p.ps1 = probs.stride(1);
  p.cand = candidates.const_data_ptr<int64_t>();
  p.cs0 = candidates.stride(0);
  p.cs1 = candidates.stride(1);
  p.first_child = first_child.const_data_ptr<int64_t>();
  p.fsb = first_child.dim() == 2 ? first_child.stride(0) : 0;  // [B, N] or one [N] for all
  p.fs = first_child.stride(-1);
  p.next_sibling = next_sibling.const_data_ptr<int64_t>();
  p.nsb = next_sibling.dim() == 2 ? next_sibling.stride(0) : 0;
  p.ns = next_sibling.stride(-1);
  p.uniform = uniform.const_data_ptr<float>();
  p.us0 = uniform.stride(0);
  p.us1 = uniform.stride(1);
  p.accept_len = accept_len.mutable_data_ptr<int64_t>();
  p.out_tokens = out_tokens.mutable_data_ptr<int64_t>();
  p.accepted_nodes = accepted_nodes.mutable_data_ptr<int64_t>();
  p.B = static_cast<int>(B);
  p.N = static_cast<int>(N);
  p.L = static_cast<int>(L);
  p.V = probs.size(2);
  const cudaError_t err = kernels::launch_accept_sample(p, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "hydra_fast.accept_sample: CUDA launch failed: ", cudaGetErrorString(err));
  return {accept_len, out_tokens, accepted_nodes};
}

}  // namespace

TORCH_LIBRARY_IMPL(hydra_fast, CUDA, m) { m.impl("accept_sample", &accept_sample_cuda); }

}  // namespace hydra_fast

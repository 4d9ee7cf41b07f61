// CUDA glue of accept_greedy and accept_typical: checks, device guard, current stream, dtype dispatch,
// launch of the two phases. See kernels/accept.cuh.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "checks.h"
#include "glue.h"
#include "kernels/accept.cuh"
#include "static_switch.h"

namespace hydra_fast {
namespace {

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

Outputs accept_cuda(const char* op, bool typical, const at::Tensor& logits, const at::Tensor& candidates,
                    const at::Tensor& paths, const at::Tensor* uniform, double temperature,
                    double posterior_threshold, double posterior_alpha) {
  TORCH_CHECK(logits.is_cuda(), "hydra_fast.", op, ": logits must be a CUDA tensor");
  const int64_t B = logits.size(0), N = logits.size(1), V = logits.size(2);
  const int64_t P = paths.size(-2), L = paths.size(-1);
  const auto i64 = logits.options().dtype(at::kLong);
  at::Tensor accept_len = at::empty({B}, i64);        // [B]
  at::Tensor out_tokens = at::empty({B, L}, i64);     // [B, L]
  at::Tensor accepted_nodes = at::empty({B, L}, i64); // [B, L]
  if (B == 0) return {accept_len, out_tokens, accepted_nodes};
  TORCH_CHECK(V < (int64_t(1) << 31) - kernels::kAcceptChunk, "hydra_fast.", op, ": V must be < 2^31 on CUDA, got ", V);
  TORCH_CHECK(N <= 4096, "hydra_fast.", op, ": N must be <= 4096 on CUDA, got ", N);
  TORCH_CHECK(B <= 0x7fffffff && P * L <= 0x7fffffff, "hydra_fast.", op, ": too many sequences or paths");

  const c10::cuda::CUDAGuard guard(logits.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int sms = cuda_glue::sm_count(logits.get_device());

  kernels::AcceptParams p{};
  p.logits = logits.const_data_ptr();
  p.ls0 = logits.stride(0);
  p.ls1 = logits.stride(1);
  p.cand = candidates.const_data_ptr<int64_t>();
  p.cs0 = candidates.stride(0);
  p.cs1 = candidates.stride(1);
  p.paths = paths.const_data_ptr<int64_t>();
  p.psb = paths.dim() == 3 ? paths.stride(0) : 0;  // [B, P, L] or one [P, L] for all
  p.ps0 = paths.stride(-2);
  p.ps1 = paths.stride(-1);
  if (uniform != nullptr) {
    p.uniform = uniform->const_data_ptr<float>();
    p.us0 = uniform->stride(0);
  }
  p.B = static_cast<int>(B);
  p.N = static_cast<int>(N);
  p.P = static_cast<int>(P);
  p.L = static_cast<int>(L);
  p.V = V;
  p.chunks = static_cast<int>((V + kernels::kAcceptChunk - 1) / kernels::kAcceptChunk);
  p.temperature = temperature;
  p.inv_temp = static_cast<float>(1.0 / temperature);
  p.posterior_threshold = posterior_threshold;
  p.posterior_alpha = posterior_alpha;
  at::Tensor states = at::empty({B, N, p.chunks, 4}, logits.options().dtype(at::kFloat));  // [B, N, chunks, 4]
  p.states = reinterpret_cast<float4*>(states.mutable_data_ptr<float>());
  p.accept_len = accept_len.mutable_data_ptr<int64_t>();
  p.out_tokens = out_tokens.mutable_data_ptr<int64_t>();
  p.accepted_nodes = accepted_nodes.mutable_data_ptr<int64_t>();

  // 16-byte loads when every row starts 16-byte aligned and V fills whole vectors.
  const int64_t vec = 16 / logits.element_size();
  const bool vec16 = cuda_glue::ptr_aligned(logits.const_data_ptr(), 16) && V % vec == 0 &&
                     (B == 1 || logits.stride(0) % vec == 0) && (N == 1 || logits.stride(1) % vec == 0);

  cudaError_t err = cudaSuccess;
  HF_DTYPE_SWITCH(logits.scalar_type(), T, [&] {
    err = typical ? kernels::launch_accept<T, true>(p, vec16, sms, stream)
                  : kernels::launch_accept<T, false>(p, vec16, sms, stream);
  });
  TORCH_CHECK(err == cudaSuccess, "hydra_fast.", op, ": CUDA launch failed: ", cudaGetErrorString(err));
  return {accept_len, out_tokens, accepted_nodes};
}

Outputs accept_greedy_cuda(const at::Tensor& logits, const at::Tensor& candidates, const at::Tensor& paths) {
  check_accept("accept_greedy", logits, candidates, paths);
  return accept_cuda("accept_greedy", false, logits, candidates, paths, nullptr, 1.0, 0.0, 0.0);
}

Outputs accept_typical_cuda(const at::Tensor& logits, const at::Tensor& candidates, const at::Tensor& paths,
                            const at::Tensor& uniform, double temperature, double posterior_threshold,
                            double posterior_alpha) {
  check_accept("accept_typical", logits, candidates, paths);
  check_accept_typical_extra(logits, uniform, temperature, posterior_threshold, posterior_alpha);
  return accept_cuda("accept_typical", true, logits, candidates, paths, &uniform, temperature, posterior_threshold,
                     posterior_alpha);
}

}  // namespace

TORCH_LIBRARY_IMPL(hydra_fast, CUDA, m) {
  m.impl("accept_greedy", &accept_greedy_cuda);
  m.impl("accept_typical", &accept_typical_cuda);
}

}  // namespace hydra_fast

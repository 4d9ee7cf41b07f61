// CUDA glue of dynamic_tree_layout: checks, the kernel's size limits, device guard, current stream, the mask's
// vector width, launch. See kernels/dynamic_tree_layout.cuh.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "checks.h"
#include "glue.h"
#include "kernels/dynamic_tree_layout.cuh"

namespace hydra_fast {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dynamic_tree_layout_cuda(
    const at::Tensor& score, const at::Tensor& parent, const at::Tensor& candidate_depth, int64_t nodes,
    int64_t context_len, int64_t max_depth) {
  const char* op = "hydra_fast.dynamic_tree_layout";
  check_dynamic_tree_layout(score, parent, candidate_depth, nodes, context_len, max_depth);
  TORCH_CHECK(score.is_cuda(), op, ": score must be a CUDA tensor");
  const int64_t B = score.size(0), C = score.size(1), N = 1 + nodes + context_len, L = max_depth + 1;
  TORCH_CHECK(C <= kernels::kLayoutMaxCandidates, op, ": the CUDA kernel sorts at most ",
              kernels::kLayoutMaxCandidates, " candidates per sequence (in shared memory), got C = ", C,
              ": draft fewer candidates (lower the dynamic tree's topk, width or depth)");
  TORCH_CHECK(N <= kernels::kLayoutMaxNodes, op, ": the CUDA kernel lays out at most ", kernels::kLayoutMaxNodes,
              " tree nodes per sequence, got N = 1 + nodes + context_len = ", N, ": lower nodes or context_len");
  TORCH_CHECK(B <= 0x7fffffff && L <= 0x7fffffff, op, ": B and max_depth must be < 2^31 on CUDA, got B = ", B,
              ", max_depth = ", max_depth);
  const auto i64 = score.options().dtype(at::kLong);
  at::Tensor kept = at::empty({B, nodes}, i64);                                  // [B, nodes]
  at::Tensor paths = at::empty({B, N, L}, i64);                                  // [B, N, L]
  at::Tensor tree_mask = at::empty({B, N, N}, score.options().dtype(at::kBool));  // [B, N, N]
  at::Tensor depth = at::empty({B, N}, i64);                                     // [B, N]
  at::Tensor first_child = at::empty({B, N}, i64);                               // [B, N]
  at::Tensor next_sibling = at::empty({B, N}, i64);                              // [B, N]
  if (B == 0) return {kept, paths, tree_mask, depth, first_child, next_sibling};

  const c10::cuda::CUDAGuard guard(score.device());
  kernels::DynamicTreeLayoutParams p{};
  p.score = score.const_data_ptr<float>();
  p.score_s0 = score.stride(0);
  p.score_s1 = score.stride(1);
  p.parent = parent.const_data_ptr<int64_t>();
  p.parent_s0 = parent.stride(0);
  p.parent_s1 = parent.stride(1);
  p.candidate_depth = candidate_depth.const_data_ptr<int64_t>();
  p.depth_s0 = candidate_depth.stride(0);
  p.kept = kept.mutable_data_ptr<int64_t>();
  p.paths = paths.mutable_data_ptr<int64_t>();
  p.tree_mask = reinterpret_cast<uint8_t*>(tree_mask.mutable_data_ptr<bool>());
  p.depth = depth.mutable_data_ptr<int64_t>();
  p.first_child = first_child.mutable_data_ptr<int64_t>();
  p.next_sibling = next_sibling.mutable_data_ptr<int64_t>();
  p.B = static_cast<int>(B);
  p.C = static_cast<int>(C);
  p.nodes = static_cast<int>(nodes);
  p.M = static_cast<int>(context_len);
  p.L = static_cast<int>(L);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto fits = [&](int64_t vec) {  // mask rows split into aligned vectors of `vec` bytes
    return N % vec == 0 && cuda_glue::ptr_aligned(p.tree_mask, static_cast<size_t>(vec));
  };
  const cudaError_t err = fits(16)  ? kernels::launch_dynamic_tree_layout<16>(p, stream)
                          : fits(8) ? kernels::launch_dynamic_tree_layout<8>(p, stream)
                          : fits(4) ? kernels::launch_dynamic_tree_layout<4>(p, stream)
                                    : kernels::launch_dynamic_tree_layout<1>(p, stream);
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
  return {kept, paths, tree_mask, depth, first_child, next_sibling};
}

}  // namespace

TORCH_LIBRARY_IMPL(hydra_fast, CUDA, m) { m.impl("dynamic_tree_layout", &dynamic_tree_layout_cuda); }

}  // namespace hydra_fast

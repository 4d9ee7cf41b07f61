// CUDA glue of topk_rows: checks, device guard, current stream, dtype / list-length / vector-width dispatch,
// launch. See kernels/topk_rows.cuh. k > 32 (or rows longer than int32 indices reach) sort the rows instead
// (sorted_by_keys).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "glue.h"
#include "kernels/topk_rows.cuh"
#include "static_switch.h"
#include "topk_rows.h"

namespace hydra_fast {
namespace {

constexpr int64_t kMaxKernelK = 32;

// The rows sorted by the kernel's order keys, made with tensor ops: the fp32 value mapped to an order-preserving
// unsigned 32-bit integer (-0.0 as +0.0, NaN the largest) times 2^31, plus 2^31 - 1 - index (a tie goes to the lower
// index); keys are unique, so the order is the specification's. (torch.sort's own order of NaNs on CUDA is not:
// on the H200 it disagreed with the CPU's stable sort.) For k > 32 and rows past int32 indices (int64 keys:
// indices < 2^31 here; longer rows sort by value with a stable sort, the reference's definition).
std::tuple<at::Tensor, at::Tensor> sorted_by_keys(const at::Tensor& x, int64_t k) {
  const int64_t V = x.size(-1);
  if (V > std::numeric_limits<int32_t>::max()) {
    const auto [values, indices] = at::sort(x, /*stable=*/true, /*dim=*/-1, /*descending=*/true);
    return {values.narrow(-1, 0, k).contiguous(), indices.narrow(-1, 0, k).contiguous()};
  }
  const at::Tensor f = x.to(at::kFloat).contiguous();                                   // exact for 16-bit
  at::Tensor bits = f.view(at::kInt).to(at::kLong).bitwise_and(0xffffffffLL);           // [..., V] in [0, 2^32)
  bits = at::where(bits.bitwise_and(0x7fffffffLL).eq(0), at::zeros_like(bits), bits);  // -0.0 as +0.0
  const at::Tensor negative = bits.ge(0x80000000LL);
  at::Tensor ordered = at::where(negative, bits.bitwise_xor(0xffffffffLL), bits.bitwise_or(0x80000000LL));
  ordered = at::where(f.isnan(), at::full_like(ordered, 0xffffffffLL), ordered);
  const at::Tensor index = at::arange(V, x.options().dtype(at::kLong));
  const at::Tensor key = ordered.mul(int64_t(1) << 31).add(index.neg().add((int64_t(1) << 31) - 1));
  const at::Tensor top = std::get<1>(at::sort(key, /*stable=*/false, /*dim=*/-1, /*descending=*/true));
  const at::Tensor indices = top.narrow(-1, 0, k).contiguous();
  return {x.gather(-1, indices).contiguous(), indices};
}

std::tuple<at::Tensor, at::Tensor> topk_rows_cuda(const at::Tensor& x, int64_t k) {
  TORCH_CHECK(x.is_cuda(), "hydra_fast.topk_rows: x must be a CUDA tensor");
  const std::optional<RowLayout> layout = check_topk_rows(x, k);
  const int64_t V = x.size(-1);
  const c10::cuda::CUDAGuard guard(x.device());
  if (k > kMaxKernelK || V > std::numeric_limits<int32_t>::max()) return sorted_by_keys(x, k);
  const TopkRowsIO io = topk_rows_io(x, k, layout);
  const RowLayout xl = io.layout;
  if (xl.rows == 0) return {io.values, io.indices};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool wide = cuda_glue::rows_aligned(io.x, xl.rows, xl.row_stride, 16 / io.x.element_size());
  kernels::TopkRowsParams p{};
  p.x = io.x.const_data_ptr();
  p.values = io.values.mutable_data_ptr();
  p.indices = io.indices.mutable_data_ptr<int64_t>();
  p.x_stride = xl.row_stride;
  p.rows = xl.rows;
  p.V = static_cast<int>(V);
  p.k = static_cast<int>(k);
  const bool pdl = cuda_glue::pdl_allowed();
  const cudaError_t err = HF_DTYPE_SWITCH(x.scalar_type(), T, [&] {
    return HF_POW2_4_TO_32_SWITCH(k, kK, [&] {
      return wide ? kernels::launch_topk_rows<T, kK, 16 / sizeof(T)>(p, stream, pdl)
                  : kernels::launch_topk_rows<T, kK, 1>(p, stream, pdl);
    });
  });
  TORCH_CHECK(err == cudaSuccess, "hydra_fast.topk_rows: CUDA launch failed: ", cudaGetErrorString(err));
  return {io.values, io.indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(hydra_fast, CUDA, m) { m.impl("topk_rows", &topk_rows_cuda); }

}  // namespace hydra_fast

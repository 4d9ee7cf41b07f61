// Device helpers shared by the hydra_fast kernels: conversions, packed 16-bit pairs, warp reductions and the
// PTX wrappers (mma.sync, ldmatrix, cp.async). Torch-free; works with __CUDA_NO_HALF*_OPERATORS__ and
// __CUDA_NO_*_CONVERSIONS__ defined (every conversion is an explicit intrinsic).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>

namespace hydra_fast::kernels {

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }
__host__ __device__ constexpr int64_t ceil_div64(int64_t a, int64_t b) { return (a + b - 1) / b; }

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }
__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fc00000); }
// Bit test: stays exact under --use_fast_math.
__device__ __forceinline__ bool is_nan(float x) { return (__float_as_uint(x) & 0x7fffffffu) > 0x7f800000u; }

// ---- scalar conversions ------------------------------------------------------------------------------------
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// ---- packed pairs of 16-bit values in one 32-bit register (low half = first element) ------------------------
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  return static_cast<uint32_t>(__half_as_ushort(__float2half_rn(lo))) |
         (static_cast<uint32_t>(__half_as_ushort(__float2half_rn(hi))) << 16);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  return static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(lo))) |
         (static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(hi))) << 16);
}

// 16-bit element i (0 = low) of a 32-bit word, as float.
template <typename T>
__device__ __forceinline__ float unpack_lo(uint32_t w);
template <typename T>
__device__ __forceinline__ float unpack_hi(uint32_t w);
template <>
__device__ __forceinline__ float unpack_lo<__half>(uint32_t w) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)));
}
template <>
__device__ __forceinline__ float unpack_hi<__half>(uint32_t w) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
}
template <>
__device__ __forceinline__ float unpack_lo<__nv_bfloat16>(uint32_t w) { return __uint_as_float(w << 16); }
template <>
__device__ __forceinline__ float unpack_hi<__nv_bfloat16>(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }

// The 16 / sizeof(T) values of a 16-byte vector, as floats.
template <typename T>
__device__ __forceinline__ void unpack16(const uint4& v, float* out) {
  if constexpr (sizeof(T) == 4) {
    out[0] = __uint_as_float(v.x);
    out[1] = __uint_as_float(v.y);
    out[2] = __uint_as_float(v.z);
    out[3] = __uint_as_float(v.w);
  } else {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      out[2 * i] = unpack_lo<T>(w[i]);
      out[2 * i + 1] = unpack_hi<T>(w[i]);
    }
  }
}

// ---- warp reductions ---------------------------------------------------------------------------------------
__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
__device__ __forceinline__ double warp_sum(double x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// ---- programmatic dependent launch (sm_90+) -----------------------------------------------------------------
// A kernel launched by launch_kernel(..., pdl = true) may be scheduled while the kernel before it on the stream is
// still running, so that its launch and ramp-up overlap that kernel's tail. Such a kernel must call pdl_wait()
// before it reads anything an earlier kernel wrote and before it writes anything at all (it returns once every
// earlier kernel has finished and its writes are visible; at once when the launch had no programmatic dependency).
// Before the wait it may only read data no kernel writes, or issue L2 prefetches (hints: never wrong). After the
// wait, pdl_launch_dependents() lets the next such kernel be scheduled. Both are no-ops before sm_90.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
// Prefetch the 128-byte line holding p into L2 (a hint; safe before pdl_wait()).
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }

// Whether the code the current device runs for `kernel` was compiled from sm_90+ PTX (__CUDA_ARCH__ >= 900): only
// then is pdl_wait() the real wait and are thread-block clusters in the code. A build for older architectures
// only, JIT-compiled from its PTX on a newer GPU, has a newer binary version but no-op waits, and must launch
// neither with the programmatic attribute nor in clusters. Every kernel of the extension is built for the same
// architectures, so the answer is kept per device.
// A yes/no answer about the current device, computed by `ask` the first time and then read from `slots` (one per
// device, 0 unknown, 1 no, 2 yes); false without a current device among the first 64.
template <typename Ask>
bool per_device_answer(std::array<std::atomic<int>, 64>& slots, Ask&& ask) {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 64) return false;
  int v = slots[device].load(std::memory_order_relaxed);
  if (v == 0) {
    v = ask() ? 2 : 1;
    slots[device].store(v, std::memory_order_relaxed);
  }
  return v == 2;
}

inline bool code_from_sm90(const void* kernel) {
  static std::array<std::atomic<int>, 64> slots{};
  return per_device_answer(slots, [&] {
    cudaFuncAttributes a{};
    return cudaFuncGetAttributes(&a, kernel) == cudaSuccess && a.ptxVersion >= 90;
  });
}

// The launch attribute that groups `x` consecutive CTAs along x into a thread-block cluster.
inline cudaLaunchAttribute cluster_attribute(unsigned x) {
  cudaLaunchAttribute a{};
  a.id = cudaLaunchAttributeClusterDimension;
  a.val.clusterDim.x = x;
  a.val.clusterDim.y = 1;
  a.val.clusterDim.z = 1;
  return a;
}

// Launch `kernel` on `stream`, with the programmatic-stream-serialization attribute when `pdl` and the kernel's
// code has the real wait (the kernel then follows the pdl_wait() contract above), and in clusters of `cluster_x`
// consecutive CTAs along x when cluster_x > 1 (the caller checked code_from_sm90(kernel) and that cluster_x
// divides grid.x; at most 8, the portable cluster size); returns the launch error.
template <typename... KernelArgs, typename... Args>
cudaError_t launch_kernel_in_clusters(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem,
                                      cudaStream_t stream, bool pdl, unsigned cluster_x, Args&&... args) {
  pdl = pdl && code_from_sm90(reinterpret_cast<const void*>(kernel));
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[2];
  unsigned n = 0;
  if (pdl) {
    attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[n++].val.programmaticStreamSerializationAllowed = 1;
  }
  if (cluster_x > 1) attr[n++] = cluster_attribute(cluster_x);
  cfg.attrs = attr;
  cfg.numAttrs = n;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

template <typename... KernelArgs, typename... Args>
cudaError_t launch_kernel(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                          bool pdl, Args&&... args) {
  return launch_kernel_in_clusters(kernel, grid, block, smem, stream, pdl, 1u, std::forward<Args>(args)...);
}

// Resident CTAs per SM of `kernel` at `threads` threads and `smem` bytes of dynamic shared memory on the current
// device, queried once per (kernel, device, threads, smem) and then read from a table: the query is host work a
// launch should not repeat.
inline cudaError_t occupancy_per_sm(const void* kernel, int threads, size_t smem, int* per_sm) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  static std::mutex mutex;
  static std::map<std::tuple<const void*, int, int, size_t>, int> table;
  const auto key = std::make_tuple(kernel, device, threads, smem);
  {
    const std::lock_guard<std::mutex> lock(mutex);
    const auto it = table.find(key);
    if (it != table.end()) {
      *per_sm = it->second;
      return cudaSuccess;
    }
  }
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(per_sm, kernel, threads, smem);
  if (err != cudaSuccess) return err;
  const std::lock_guard<std::mutex> lock(mutex);
  table.emplace(key, *per_sm);
  return cudaSuccess;
}

// ---- global loads ------------------------------------------------------------------------------------------
// Read-only 16-byte load that is used once (weights, logits): no L1 allocation.
__device__ __forceinline__ uint4 ld_stream_u4(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}
// Read-only 16-byte load through L1 (data that other warps of the SM read too).
__device__ __forceinline__ uint4 ld_cached_u4(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

// ---- tensor cores: mma.sync m16n8k16, fp32 accumulate ------------------------------------------------------
// A row-major 16x16 (a[0..3]), B "col" 16x8 (b[0..1]), C/D 16x8 fp32 (c[0..3]); fragment layouts as in the PTX
// ISA: with g = lane / 4 and t = lane % 4, c[0..1] = (row g, cols 2t, 2t+1), c[2..3] = (row g + 8, same cols).
template <typename T>
__device__ __forceinline__ void mma_16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__half>(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t* r, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// ---- cp.async (16 bytes, L2 only); src_bytes = 0 zero-fills the destination without reading ----------------
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N));
}

}  // namespace hydra_fast::kernels

// Device math shared by the fused decoder-layer kernels (rms_norm.cuh, silu_mul.cuh, rope_kv_write.cuh), in the
// rounding order of reference.py: values are computed in fp32 and rounded to the tensor dtype T (float, __half,
// __nv_bfloat16) exactly where PyTorch rounds a T tensor op. The extension is built with --use_fast_math, so every
// operation whose rounding matters is an explicit round-to-nearest intrinsic (no FMA contraction, IEEE division
// and square root), and exp runs in double (the fast-math expf is off by more than an ulp).
#pragma once

#include "common.cuh"

namespace hydra_fast::kernels {

// kN consecutive values of T, loaded and stored as one access (16 bytes when kN * sizeof(T) == 16).
template <typename T, int kN>
struct alignas(sizeof(T) * kN) Vec {
  T v[kN];
};

template <typename T, int kN>
__device__ __forceinline__ Vec<T, kN> load_raw(const T* p) {
  return *reinterpret_cast<const Vec<T, kN>*>(p);
}

template <typename T, int kN>
__device__ __forceinline__ void load_vec(const T* p, float* out) {
  const Vec<T, kN> w = load_raw<T, kN>(p);
#pragma unroll
  for (int i = 0; i < kN; ++i) out[i] = to_float(w.v[i]);
}

// Stores values that are already exact in T (rounded before), so the conversion is exact.
template <typename T, int kN>
__device__ __forceinline__ void store_vec(T* p, const float* in) {
  Vec<T, kN> w;
#pragma unroll
  for (int i = 0; i < kN; ++i) w.v[i] = from_float<T>(in[i]);
  *reinterpret_cast<Vec<T, kN>*>(p) = w;
}

// v rounded to T, back in fp32.
template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return to_float(from_float<T>(v));
}

// T(a * b) and T(a + b), each a single IEEE fp32 operation first (as a T tensor op computes them).
template <typename T>
__device__ __forceinline__ float mul_t(float a, float b) {
  return round_to<T>(__fmul_rn(a, b));
}
template <typename T>
__device__ __forceinline__ float add_t(float a, float b) {
  return round_to<T>(__fadd_rn(a, b));
}

// 1 / sqrt(sum / d + eps), from the row's fp32 sum of squares: PyTorch's mean (sum, then divide) and rsqrt.
__device__ __forceinline__ float rms_inv_from_sum(float sum, int d, float eps) {
  const float ms = __fdiv_rn(sum, static_cast<float>(d));
  return __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(ms, eps)));
}

// T(w * T(v * r)): the normalised value of reference.rms_norm.
template <typename T>
__device__ __forceinline__ float rms_scale(float v, float r, float w) {
  return mul_t<T>(w, mul_t<T>(v, r));
}

// T(T(silu(gate)) * up), silu(g) = g / (1 + exp(-g)) as PyTorch computes it.
template <typename T>
__device__ __forceinline__ float silu_mul_value(float gate, float up) {
  const float e = static_cast<float>(exp(-static_cast<double>(gate)));
  return mul_t<T>(round_to<T>(__fdiv_rn(gate, __fadd_rn(1.0f, e))), up);
}

}  // namespace hydra_fast::kernels

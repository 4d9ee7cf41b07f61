// Scalar math shared by the CPU kernels of the fused decoder-layer ops (rms_norm.cpp, silu_mul.cpp,
// rope_kv_write.cpp), in the rounding order of reference.py: every value is computed in fp32 and rounded to the
// tensor dtype T exactly where PyTorch rounds a T tensor op (T is float, c10::Half or c10::BFloat16; converting
// float -> T rounds to nearest even). The build passes -ffp-contract=off, so a * b + c * d is never fused into
// an FMA that PyTorch's separate ops would not do.
#pragma once

#include <cmath>
#include <cstdint>

namespace hydra_fast::cpu_math {

// v rounded to T, back in fp32.
template <typename T>
inline float round_to(float v) {
  return static_cast<float>(static_cast<T>(v));
}

// 1 / sqrt(mean(v^2) + eps) of v[0..d): the mean square as PyTorch gets it (an fp32 sum, divided by d in fp32).
// The sum runs in double, so it is the correctly rounded fp32 sum, which PyTorch's cascaded fp32 sum matches
// but for an occasional last bit.
inline float rms_inv(const float* v, int64_t d, float eps) {
  double sum = 0.0;
  for (int64_t i = 0; i < d; ++i) sum += static_cast<double>(v[i]) * v[i];
  const float ms = static_cast<float>(sum) / static_cast<float>(d);
  return 1.0f / std::sqrt(ms + eps);
}

// v[i] <- T(weight[i] * T(v[i] * rms_inv(v))), in place: reference.rms_norm of one row held in fp32 (the
// results are values of T).
template <typename T>
inline void rms_norm_row(float* v, const T* weight, int64_t d, float eps) {
  const float r = rms_inv(v, d, eps);
  for (int64_t i = 0; i < d; ++i) v[i] = round_to<T>(static_cast<float>(weight[i]) * round_to<T>(v[i] * r));
}

// silu(gate) rounded to T, then times up (F.silu(gate) * up on T tensors).
template <typename T>
inline T silu_mul(float gate, float up) {
  return static_cast<T>(round_to<T>(gate / (1.0f + std::exp(-gate))) * up);
}

}  // namespace hydra_fast::cpu_math

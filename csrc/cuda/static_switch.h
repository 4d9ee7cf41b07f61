// Runtime values -> compile-time constants for kernel templates, in one place (after flash-attention's
// hopper/static_switch.h). Each macro runs its lambda body with the named constant or type in scope:
//
//   HF_DTYPE_SWITCH(q.scalar_type(), T, [&] { launch<T>(...); });
//   HF_BOOL_SWITCH(has_res, kHasRes, [&] { launch<kHasRes>(...); });
//
// The CUDA types are the native ones (__half, __nv_bfloat16, float): device code never sees at::Half.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define HF_BOOL_SWITCH(COND, CONST_NAME, ...) \
  [&] {                                       \
    if (COND) {                               \
      constexpr static bool CONST_NAME = true; \
      return __VA_ARGS__();                   \
    } else {                                  \
      constexpr static bool CONST_NAME = false; \
      return __VA_ARGS__();                   \
    }                                         \
  }()

// float, half and bfloat16 (what checks.h admits for every floating input).
#define HF_DTYPE_SWITCH(DTYPE, TYPE_NAME, ...)                                              \
  [&] {                                                                                     \
    switch (DTYPE) {                                                                        \
      case c10::ScalarType::Float: {                                                        \
        using TYPE_NAME = float;                                                            \
        return __VA_ARGS__();                                                               \
      }                                                                                     \
      case c10::ScalarType::Half: {                                                         \
        using TYPE_NAME = __half;                                                           \
        return __VA_ARGS__();                                                               \
      }                                                                                     \
      case c10::ScalarType::BFloat16: {                                                     \
        using TYPE_NAME = __nv_bfloat16;                                                    \
        return __VA_ARGS__();                                                               \
      }                                                                                     \
      default:                                                                              \
        TORCH_CHECK(false, "hydra_fast: unsupported dtype ", DTYPE, " (float, half, bfloat16)"); \
    }                                                                                       \
  }()

// Only the 16-bit types (the tensor-core paths).
#define HF_HALF_DTYPE_SWITCH(DTYPE, TYPE_NAME, ...)                                  \
  [&] {                                                                              \
    if ((DTYPE) == c10::ScalarType::Half) {                                          \
      using TYPE_NAME = __half;                                                      \
      return __VA_ARGS__();                                                          \
    } else {                                                                         \
      TORCH_CHECK((DTYPE) == c10::ScalarType::BFloat16, "hydra_fast: expected half or bfloat16, got ", DTYPE); \
      using TYPE_NAME = __nv_bfloat16;                                               \
      return __VA_ARGS__();                                                          \
    }                                                                                \
  }()

// Head dims with a tensor-core path.
#define HF_HEADDIM_SWITCH(HEADDIM, CONST_NAME, ...)                              \
  [&] {                                                                          \
    if ((HEADDIM) == 64) {                                                       \
      constexpr static int CONST_NAME = 64;                                      \
      return __VA_ARGS__();                                                      \
    } else {                                                                     \
      TORCH_CHECK((HEADDIM) == 128, "hydra_fast: no fast path for head dim ", HEADDIM); \
      constexpr static int CONST_NAME = 128;                                     \
      return __VA_ARGS__();                                                      \
    }                                                                            \
  }()

// Register-array sizes: the smallest of 1, 2, 4, 8 that is >= VALUE (VALUE <= 8).
#define HF_POW2_UPTO8_SWITCH(VALUE, CONST_NAME, ...) \
  [&] {                                              \
    if ((VALUE) <= 1) {                              \
      constexpr static int CONST_NAME = 1;           \
      return __VA_ARGS__();                          \
    } else if ((VALUE) <= 2) {                       \
      constexpr static int CONST_NAME = 2;           \
      return __VA_ARGS__();                          \
    } else if ((VALUE) <= 4) {                       \
      constexpr static int CONST_NAME = 4;           \
      return __VA_ARGS__();                          \
    } else {                                         \
      TORCH_CHECK((VALUE) <= 8, "hydra_fast: switch value ", VALUE, " > 8"); \
      constexpr static int CONST_NAME = 8;           \
      return __VA_ARGS__();                          \
    }                                                \
  }()

// Register-list lengths (topk_rows): the smallest of 4, 8, 16, 32 that is >= VALUE (VALUE <= 32).
#define HF_POW2_4_TO_32_SWITCH(VALUE, CONST_NAME, ...) \
  [&] {                                                \
    if ((VALUE) <= 4) {                                \
      constexpr static int CONST_NAME = 4;             \
      return __VA_ARGS__();                            \
    } else if ((VALUE) <= 8) {                         \
      constexpr static int CONST_NAME = 8;             \
      return __VA_ARGS__();                            \
    } else if ((VALUE) <= 16) {                        \
      constexpr static int CONST_NAME = 16;            \
      return __VA_ARGS__();                            \
    } else {                                           \
      TORCH_CHECK((VALUE) <= 32, "hydra_fast: switch value ", VALUE, " > 32"); \
      constexpr static int CONST_NAME = 32;            \
      return __VA_ARGS__();                            \
    }                                                  \
  }()

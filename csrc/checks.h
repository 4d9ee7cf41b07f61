// Input validation shared by the CPU kernels (csrc/cpu/) and the CUDA glue (csrc/cuda/). Header-only.
//
// Every failure is a TORCH_CHECK (RuntimeError in Python) whose message names the op and the argument and
// says what was expected and what was given. The checks look only at metadata (device, dtype, shape,
// strides, scalar arguments) and never read tensor data, so they are free on CUDA and safe during graph
// capture. Value conditions (cache_lens[b] + N <= S, node indices in range, paths forming a tree) are the
// caller's contract (the decoding engine guarantees them); the CPU kernels clamp indices so that a broken
// contract gives wrong numbers, never an out-of-bounds read or write.
//
// Requirements specific to one backend (CUDA alignment, D % 8, ...) live in that backend's glue, not here.
#pragma once

#include <ATen/TensorUtils.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <string>

namespace hydra_fast {
namespace checks_detail {

inline bool is_low_or_fp32(at::ScalarType t) {
  return t == at::kBFloat16 || t == at::kHalf || t == at::kFloat;
}

inline void same_device(const char* op, const std::string& name, const at::Tensor& t, const char* ref_name,
                        const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), "hydra_fast.", op, ": ", name, " must be on the same device as ", ref_name,
              " (", ref.device(), "), got ", t.device());
}

inline void dims(const char* op, const std::string& name, const at::Tensor& t, int64_t n, const char* layout) {
  TORCH_CHECK(t.dim() == n, "hydra_fast.", op, ": ", name, " must have ", n, " dims ", layout, ", got ", t.dim());
}

inline void dtype(const char* op, const std::string& name, const at::Tensor& t, at::ScalarType expected) {
  TORCH_CHECK(t.scalar_type() == expected, "hydra_fast.", op, ": ", name, " must be ", expected, ", got ",
              t.scalar_type());
}

inline void float_dtype(const char* op, const std::string& name, const at::Tensor& t) {
  TORCH_CHECK(is_low_or_fp32(t.scalar_type()), "hydra_fast.", op, ": ", name,
              " must be bfloat16, float16 or float32, got ", t.scalar_type());
}

inline void same_dtype(const char* op, const std::string& name, const at::Tensor& t, const char* ref_name,
                       const at::Tensor& ref) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "hydra_fast.", op, ": ", name, " must have the dtype of ",
              ref_name, " (", ref.scalar_type(), "), got ", t.scalar_type());
}

// t.size(d) must equal `expected`; `what` names the size ("B", "D", ...) and where the expectation comes from.
inline void size(const char* op, const std::string& name, const at::Tensor& t, int64_t d, int64_t expected,
                 const char* what) {
  TORCH_CHECK(t.size(d) == expected, "hydra_fast.", op, ": ", name, ".size(", d, ") must be ", what, " = ",
              expected, ", got ", t.size(d));
}

// A tree descriptor shared by the batch ([N, N], [P, L], [N]: `shared_dims` dims) or one per sequence (the same
// with a leading batch dim [B, ...] equal to B). Returns whether it is per sequence.
inline bool tree_dims(const char* op, const std::string& name, const at::Tensor& t, int64_t shared_dims,
                      const char* shared_layout, const char* batched_layout, int64_t B, const char* b_from) {
  const bool batched = t.dim() == shared_dims + 1;
  TORCH_CHECK(t.dim() == shared_dims || batched, "hydra_fast.", op, ": ", name, " must have ", shared_dims, " dims ",
              shared_layout, " (one tree for the whole batch) or ", shared_dims + 1, " dims ", batched_layout,
              " (one tree per sequence), got ", t.dim());
  if (batched) size(op, name, t, 0, B, b_from);
  return batched;
}

inline void last_dim_contiguous(const char* op, const std::string& name, const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1, "hydra_fast.", op, ": ", name,
              " must have a contiguous last dim (stride 1), got stride ", t.stride(-1));
}

}  // namespace checks_detail

// q [B, Hq, N, D], k_cache/v_cache [B, Hkv, S, D], cache_lens int32 [B], tree_mask bool [N, N] or [B, N, N].
inline void check_tree_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                 const at::Tensor& cache_lens, const at::Tensor& tree_mask, double scale) {
  namespace c = checks_detail;
  const char* op = "tree_attention";
  c::same_device(op, "k_cache", k_cache, "q", q);
  c::same_device(op, "v_cache", v_cache, "q", q);
  c::same_device(op, "cache_lens", cache_lens, "q", q);
  c::same_device(op, "tree_mask", tree_mask, "q", q);
  c::dims(op, "q", q, 4, "[B, Hq, N, D]");
  c::dims(op, "k_cache", k_cache, 4, "[B, Hkv, S, D]");
  c::dims(op, "v_cache", v_cache, 4, "[B, Hkv, S, D]");
  c::dims(op, "cache_lens", cache_lens, 1, "[B]");
  c::float_dtype(op, "q", q);
  c::same_dtype(op, "k_cache", k_cache, "q", q);
  c::same_dtype(op, "v_cache", v_cache, "q", q);
  c::dtype(op, "cache_lens", cache_lens, at::kInt);
  c::dtype(op, "tree_mask", tree_mask, at::kBool);
  const int64_t B = q.size(0), Hq = q.size(1), N = q.size(2), D = q.size(3);
  const int64_t Hkv = k_cache.size(1), S = k_cache.size(2);
  c::tree_dims(op, "tree_mask", tree_mask, 2, "[N, N]", "[B, N, N]", B, "B from q");
  c::size(op, "k_cache", k_cache, 0, B, "B from q");
  c::size(op, "k_cache", k_cache, 3, D, "D from q");
  for (int64_t d = 0; d < 4; ++d) c::size(op, "v_cache", v_cache, d, k_cache.size(d), "the size of k_cache");
  c::size(op, "cache_lens", cache_lens, 0, B, "B from q");
  c::size(op, "tree_mask", tree_mask, tree_mask.dim() - 2, N, "N from q");
  c::size(op, "tree_mask", tree_mask, tree_mask.dim() - 1, N, "N from q");
  TORCH_CHECK(Hkv >= 1 && Hq % Hkv == 0, "hydra_fast.", op, ": GQA ratio: q heads Hq (", Hq,
              ") must be a positive multiple of k_cache heads Hkv (", Hkv, ")");
  TORCH_CHECK(D >= 1 && D <= 256, "hydra_fast.", op, ": head dim D must be in [1, 256], got ", D);
  TORCH_CHECK(N <= S, "hydra_fast.", op, ": tree size N (", N, ") must be <= cache capacity S (", S, ")");
  c::last_dim_contiguous(op, "q", q);
  c::last_dim_contiguous(op, "k_cache", k_cache);
  c::last_dim_contiguous(op, "v_cache", v_cache);
  (void)scale;
}

// hidden [R, d], path_tokens int64 [R, k], embed [V, d], weights[0] [d, (k+1)d], weights[i>0] [d, d],
// biases[i] [d], res_weight [d, (k+1)d] (required iff k > 0), res_bias [d] (only with res_weight).
inline void check_draft_head_mlp(const at::Tensor& hidden, const at::Tensor& path_tokens, const at::Tensor& embed,
                                 at::TensorList weights, at::TensorList biases,
                                 const std::optional<at::Tensor>& res_weight,
                                 const std::optional<at::Tensor>& res_bias) {
  namespace c = checks_detail;
  const char* op = "draft_head_mlp";
  c::same_device(op, "path_tokens", path_tokens, "hidden", hidden);
  c::same_device(op, "embed", embed, "hidden", hidden);
  c::dims(op, "hidden", hidden, 2, "[R, d]");
  c::dims(op, "path_tokens", path_tokens, 2, "[R, k]");
  c::dims(op, "embed", embed, 2, "[V, d]");
  c::float_dtype(op, "hidden", hidden);
  c::dtype(op, "path_tokens", path_tokens, at::kLong);
  c::same_dtype(op, "embed", embed, "hidden", hidden);
  const int64_t R = hidden.size(0), d = hidden.size(1), k = path_tokens.size(1);
  c::size(op, "path_tokens", path_tokens, 0, R, "R from hidden");
  c::size(op, "embed", embed, 1, d, "d from hidden");
  TORCH_CHECK(k == 0 || embed.size(0) >= 1, "hydra_fast.", op, ": embed must have at least one row when k > 0");
  TORCH_CHECK(weights.size() >= 1, "hydra_fast.", op, ": weights must hold at least one matrix, got 0");
  TORCH_CHECK(weights.size() == biases.size(), "hydra_fast.", op, ": weights and biases must have equal lengths, got ",
              weights.size(), " weights and ", biases.size(), " biases");
  const int64_t in0 = (k + 1) * d;
  for (size_t i = 0; i < weights.size(); ++i) {
    const std::string w = "weights[" + std::to_string(i) + "]";
    const std::string b = "biases[" + std::to_string(i) + "]";
    c::same_device(op, w, weights[i], "hidden", hidden);
    c::same_device(op, b, biases[i], "hidden", hidden);
    c::same_dtype(op, w, weights[i], "hidden", hidden);
    c::same_dtype(op, b, biases[i], "hidden", hidden);
    c::dims(op, w, weights[i], 2, i == 0 ? "[d, (k+1)d]" : "[d, d]");
    c::dims(op, b, biases[i], 1, "[d]");
    c::size(op, w, weights[i], 0, d, "d from hidden");
    c::size(op, w, weights[i], 1, i == 0 ? in0 : d, i == 0 ? "in-features (k+1)*d" : "d from hidden");
    c::size(op, b, biases[i], 0, d, "d from hidden");
  }
  TORCH_CHECK(in0 == d || res_weight.has_value(), "hydra_fast.", op,
              ": res_weight is required when weights[0] in-features (k+1)*d = ", in0, " != d = ", d, " (k = ", k,
              ")");
  TORCH_CHECK(!res_bias.has_value() || res_weight.has_value(), "hydra_fast.", op,
              ": res_bias was given without res_weight");
  if (res_weight.has_value()) {
    const at::Tensor& rw = *res_weight;
    c::same_device(op, "res_weight", rw, "hidden", hidden);
    c::same_dtype(op, "res_weight", rw, "hidden", hidden);
    c::dims(op, "res_weight", rw, 2, "[d, (k+1)d]");
    c::size(op, "res_weight", rw, 0, d, "d from hidden");
    c::size(op, "res_weight", rw, 1, in0, "in-features (k+1)*d");
  }
  if (res_bias.has_value()) {
    const at::Tensor& rb = *res_bias;
    c::same_device(op, "res_bias", rb, "hidden", hidden);
    c::same_dtype(op, "res_bias", rb, "hidden", hidden);
    c::dims(op, "res_bias", rb, 1, "[d]");
    c::size(op, "res_bias", rb, 0, d, "d from hidden");
  }
  c::last_dim_contiguous(op, "embed", embed);
}

// logits [B, N, V], candidates int64 [B, N], paths int64 [P, L] or [B, P, L]. `op` is "accept_greedy" or
// "accept_typical".
inline void check_accept(const char* op, const at::Tensor& logits, const at::Tensor& candidates,
                         const at::Tensor& paths) {
  namespace c = checks_detail;
  c::same_device(op, "candidates", candidates, "logits", logits);
  c::same_device(op, "paths", paths, "logits", logits);
  c::dims(op, "logits", logits, 3, "[B, N, V]");
  c::dims(op, "candidates", candidates, 2, "[B, N]");
  c::tree_dims(op, "paths", paths, 2, "[P, L]", "[B, P, L]", logits.size(0), "B from logits");
  c::float_dtype(op, "logits", logits);
  c::dtype(op, "candidates", candidates, at::kLong);
  c::dtype(op, "paths", paths, at::kLong);
  c::size(op, "candidates", candidates, 0, logits.size(0), "B from logits");
  c::size(op, "candidates", candidates, 1, logits.size(1), "N from logits");
  TORCH_CHECK(logits.size(1) >= 1, "hydra_fast.", op, ": logits must have at least one node (N >= 1), got N = 0");
  TORCH_CHECK(logits.size(2) >= 1, "hydra_fast.", op, ": logits must have a vocabulary (V >= 1), got V = 0");
  TORCH_CHECK(paths.size(-2) >= 1 && paths.size(-1) >= 1, "hydra_fast.", op,
              ": paths must hold at least one path of length >= 1, got shape ", paths.sizes());
  c::last_dim_contiguous(op, "logits", logits);
}

// uniform float32 [B]; temperature, posterior_threshold and posterior_alpha all > 0.
inline void check_accept_typical_extra(const at::Tensor& logits, const at::Tensor& uniform, double temperature,
                                       double posterior_threshold, double posterior_alpha) {
  namespace c = checks_detail;
  const char* op = "accept_typical";
  c::same_device(op, "uniform", uniform, "logits", logits);
  c::dims(op, "uniform", uniform, 1, "[B]");
  c::dtype(op, "uniform", uniform, at::kFloat);
  c::size(op, "uniform", uniform, 0, logits.size(0), "B from logits");
  TORCH_CHECK(temperature > 0, "hydra_fast.", op, ": temperature must be > 0, got ", temperature);
  TORCH_CHECK(posterior_threshold > 0, "hydra_fast.", op, ": posterior_threshold must be > 0, got ",
              posterior_threshold);
  TORCH_CHECK(posterior_alpha > 0, "hydra_fast.", op, ": posterior_alpha must be > 0, got ", posterior_alpha);
}

// k_cache/v_cache [L, B, Hkv, S, D] (same shape and dtype), cache_lens int32 [B], accepted_nodes int64 [B, Lp].
inline void check_kv_compact(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& cache_lens,
                             const at::Tensor& accepted_nodes) {
  namespace c = checks_detail;
  const char* op = "kv_compact";
  c::same_device(op, "v_cache", v_cache, "k_cache", k_cache);
  c::same_device(op, "cache_lens", cache_lens, "k_cache", k_cache);
  c::same_device(op, "accepted_nodes", accepted_nodes, "k_cache", k_cache);
  c::dims(op, "k_cache", k_cache, 5, "[L, B, Hkv, S, D]");
  c::dims(op, "v_cache", v_cache, 5, "[L, B, Hkv, S, D]");
  c::dims(op, "cache_lens", cache_lens, 1, "[B]");
  c::dims(op, "accepted_nodes", accepted_nodes, 2, "[B, Lp]");
  c::float_dtype(op, "k_cache", k_cache);
  c::same_dtype(op, "v_cache", v_cache, "k_cache", k_cache);
  c::dtype(op, "cache_lens", cache_lens, at::kInt);
  c::dtype(op, "accepted_nodes", accepted_nodes, at::kLong);
  for (int64_t d = 0; d < 5; ++d) c::size(op, "v_cache", v_cache, d, k_cache.size(d), "the size of k_cache");
  const int64_t B = k_cache.size(1), S = k_cache.size(3), D = k_cache.size(4);
  c::size(op, "cache_lens", cache_lens, 0, B, "B from k_cache");
  c::size(op, "accepted_nodes", accepted_nodes, 0, B, "B from k_cache");
  TORCH_CHECK(D <= 256, "hydra_fast.", op, ": head dim D must be <= 256, got ", D);
  TORCH_CHECK(accepted_nodes.size(1) <= S, "hydra_fast.", op, ": accepted_nodes length Lp (", accepted_nodes.size(1),
              ") must be <= cache capacity S (", S, ")");
  TORCH_CHECK(S >= 1, "hydra_fast.", op, ": cache capacity S must be >= 1, got 0");
  c::last_dim_contiguous(op, "k_cache", k_cache);
  c::last_dim_contiguous(op, "v_cache", v_cache);
}

// ---- the fused decoder-layer ops (rms_norm, add_rms_norm, silu_mul, rope_kv_write) ---------------------------

// A tensor [..., d] read as `rows` rows of its last dim, row r starting `row_stride` elements after row r - 1.
struct RowLayout {
  int64_t rows, row_stride;
};

// The leading dims of t must collapse into one row dim (t.view(-1, d) would work without a copy): slices of
// wider buffers and contiguous tensors do; a transposed leading layout is refused with what to do instead.
inline RowLayout row_layout(const char* op, const std::string& name, const at::Tensor& t) {
  const int64_t n = t.dim();
  if (t.numel() == 0) return {0, t.size(-1)};  // nothing to read or write
  int64_t rows = 1, row_stride = t.size(-1), inner = 0;  // inner: rows spanned by the dims seen so far
  for (int64_t i = n - 2; i >= 0; --i) {
    if (t.size(i) == 1) continue;
    if (inner == 0) {
      row_stride = t.stride(i);
      inner = t.size(i);
    } else {
      TORCH_CHECK(t.stride(i) == row_stride * inner, "hydra_fast.", op, ": the leading dims of ", name,
                  " (sizes ", t.sizes(), ", strides ", t.strides(), ") must form one run of equally spaced rows ",
                  "(as ", name, ".view(-1, ", t.size(-1), ") requires); pass ", name, ".contiguous()");
      inner *= t.size(i);
    }
    rows *= t.size(i);
  }
  return {rows, row_stride};
}

// x [..., d], weight [d]: same device and dtype, d >= 1, last dims contiguous, eps >= 0.
inline RowLayout check_rms_norm(const char* op, const at::Tensor& x, const at::Tensor& weight, double eps) {
  namespace c = checks_detail;
  c::same_device(op, "weight", weight, "x", x);
  TORCH_CHECK(x.dim() >= 1, "hydra_fast.", op, ": x must have at least 1 dim [..., d], got a 0-dim tensor");
  c::dims(op, "weight", weight, 1, "[d]");
  c::float_dtype(op, "x", x);
  c::same_dtype(op, "weight", weight, "x", x);
  TORCH_CHECK(x.size(-1) >= 1, "hydra_fast.", op, ": x's last dim d must be >= 1, got 0");
  c::size(op, "weight", weight, 0, x.size(-1), "d from x's last dim");
  TORCH_CHECK(eps >= 0, "hydra_fast.", op, ": eps must be >= 0, got ", eps);
  c::last_dim_contiguous(op, "x", x);
  c::last_dim_contiguous(op, "weight", weight);
  return row_layout(op, "x", x);
}

// x, residual [..., d] (same shape, device and dtype; leading strides may differ), weight [d].
struct AddRmsNormLayout {
  RowLayout x, residual;
};
inline AddRmsNormLayout check_add_rms_norm(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                                           double eps, const char* op = "add_rms_norm") {
  namespace c = checks_detail;
  const RowLayout xl = check_rms_norm(op, x, weight, eps);
  c::same_device(op, "residual", residual, "x", x);
  c::same_dtype(op, "residual", residual, "x", x);
  TORCH_CHECK(residual.sizes() == x.sizes(), "hydra_fast.", op, ": residual must have x's shape ", x.sizes(),
              ", got ", residual.sizes());
  c::last_dim_contiguous(op, "residual", residual);
  return {xl, row_layout(op, "residual", residual)};
}

// x [..., 2I]: gate | up. Last dim even and contiguous.
inline RowLayout check_silu_mul(const at::Tensor& x, const char* op = "silu_mul") {
  namespace c = checks_detail;
  TORCH_CHECK(x.dim() >= 1, "hydra_fast.", op, ": x must have at least 1 dim [..., 2I], got a 0-dim tensor");
  c::float_dtype(op, "x", x);
  TORCH_CHECK(x.size(-1) % 2 == 0, "hydra_fast.", op, ": x's last dim must be even (gate | up, 2I), got ",
              x.size(-1));
  c::last_dim_contiguous(op, "x", x);
  return row_layout(op, "x", x);
}

// ---- the fused linear ops (linear, rms_norm_linear, add_rms_norm_linear) -------------------------------------------

// The product's weight [N, K] (K from x's last dim, last dim contiguous) and bias [N] (or absent), on x's device
// and of x's dtype.
inline void check_linear_weight(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias) {
  namespace c = checks_detail;
  c::same_device(op, "weight", weight, "x", x);
  c::dims(op, "weight", weight, 2, "[N, K]");
  c::same_dtype(op, "weight", weight, "x", x);
  c::size(op, "weight", weight, 1, x.size(-1), "K from x's last dim");
  c::last_dim_contiguous(op, "weight", weight);
  if (bias) {
    c::same_device(op, "bias", *bias, "x", x);
    c::dims(op, "bias", *bias, 1, "[N]");
    c::same_dtype(op, "bias", *bias, "x", x);
    c::size(op, "bias", *bias, 0, weight.size(0), "N from weight");
    c::last_dim_contiguous(op, "bias", *bias);
  }
}

// x [..., K] (float dtype, last dim contiguous, rows as row_layout), weight [N, K], bias [N] or absent.
inline RowLayout check_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  namespace c = checks_detail;
  const char* op = "linear";
  TORCH_CHECK(x.dim() >= 1, "hydra_fast.", op, ": x must have at least 1 dim [..., K], got a 0-dim tensor");
  c::float_dtype(op, "x", x);
  c::last_dim_contiguous(op, "x", x);
  check_linear_weight(op, x, weight, bias);
  return row_layout(op, "x", x);
}

// rms_norm_linear: x [..., K] and norm_weight [K] as rms_norm, weight [N, K], bias [N] or absent.
inline RowLayout check_rms_norm_linear(const at::Tensor& x, const at::Tensor& norm_weight, double eps,
                                       const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const char* op = "rms_norm_linear";
  const RowLayout l = check_rms_norm(op, x, norm_weight, eps);
  check_linear_weight(op, x, weight, bias);
  return l;
}

// add_rms_norm_linear: x, residual [..., K] and norm_weight [K] as add_rms_norm, weight [N, K] (with silu_mul the
// MLP's gate | up, so an even row count), bias [N] or absent.
inline AddRmsNormLayout check_add_rms_norm_linear(const at::Tensor& x, const at::Tensor& residual,
                                                  const at::Tensor& norm_weight, double eps, const at::Tensor& weight,
                                                  const std::optional<at::Tensor>& bias, bool silu_mul) {
  const char* op = "add_rms_norm_linear";
  const AddRmsNormLayout l = check_add_rms_norm(x, residual, norm_weight, eps, op);
  check_linear_weight(op, x, weight, bias);
  TORCH_CHECK(!silu_mul || weight.size(0) % 2 == 0, "hydra_fast.", op, ": with silu_mul=True weight is gate | up ",
              "[2I, K]: its row count must be even, got ", weight.size(0));
  return l;
}

// qkv [B, N, (Hq + 2 Hkv) D], cos/sin [B, N, D], k_cache/v_cache [L, B, Hkv, S, D], cache_lens int32 [B],
// q_norm/k_norm [D] or absent; all floating tensors of one dtype, D even, 0 <= layer < L.
inline void check_rope_kv_write(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                                const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t layer,
                                const at::Tensor& cache_lens, int64_t num_q_heads, int64_t num_kv_heads,
                                const std::optional<at::Tensor>& q_norm, const std::optional<at::Tensor>& k_norm,
                                double eps) {
  namespace c = checks_detail;
  const char* op = "rope_kv_write";
  c::same_device(op, "cos", cos, "qkv", qkv);
  c::same_device(op, "sin", sin, "qkv", qkv);
  c::same_device(op, "k_cache", k_cache, "qkv", qkv);
  c::same_device(op, "v_cache", v_cache, "qkv", qkv);
  c::same_device(op, "cache_lens", cache_lens, "qkv", qkv);
  c::dims(op, "qkv", qkv, 3, "[B, N, (Hq + 2 Hkv) * D]");
  c::dims(op, "cos", cos, 3, "[B, N, D]");
  c::dims(op, "sin", sin, 3, "[B, N, D]");
  c::dims(op, "k_cache", k_cache, 5, "[L, B, Hkv, S, D]");
  c::dims(op, "v_cache", v_cache, 5, "[L, B, Hkv, S, D]");
  c::dims(op, "cache_lens", cache_lens, 1, "[B]");
  c::float_dtype(op, "qkv", qkv);
  c::same_dtype(op, "cos", cos, "qkv", qkv);
  c::same_dtype(op, "sin", sin, "qkv", qkv);
  c::same_dtype(op, "k_cache", k_cache, "qkv", qkv);
  c::same_dtype(op, "v_cache", v_cache, "qkv", qkv);
  c::dtype(op, "cache_lens", cache_lens, at::kInt);
  TORCH_CHECK(num_q_heads >= 1 && num_kv_heads >= 1, "hydra_fast.", op,
              ": num_q_heads and num_kv_heads must be >= 1, got ", num_q_heads, " and ", num_kv_heads);
  const int64_t B = qkv.size(0), D = cos.size(2);
  TORCH_CHECK(D >= 2 && D % 2 == 0, "hydra_fast.", op, ": head dim D (cos.size(2)) must be even and >= 2 ",
              "(rotate_half pairs element i with i + D/2), got ", D);
  c::size(op, "qkv", qkv, 2, (num_q_heads + 2 * num_kv_heads) * D, "(num_q_heads + 2 num_kv_heads) * D");
  for (int64_t d = 0; d < 2; ++d) {
    c::size(op, "cos", cos, d, qkv.size(d), d == 0 ? "B from qkv" : "N from qkv");
    c::size(op, "sin", sin, d, qkv.size(d), d == 0 ? "B from qkv" : "N from qkv");
  }
  c::size(op, "sin", sin, 2, D, "D from cos");
  c::size(op, "k_cache", k_cache, 1, B, "B from qkv");
  c::size(op, "k_cache", k_cache, 2, num_kv_heads, "num_kv_heads");
  c::size(op, "k_cache", k_cache, 4, D, "D from cos");
  for (int64_t d = 0; d < 5; ++d) c::size(op, "v_cache", v_cache, d, k_cache.size(d), "the size of k_cache");
  TORCH_CHECK(k_cache.size(3) >= 1, "hydra_fast.", op, ": cache capacity S must be >= 1, got 0");
  TORCH_CHECK(layer >= 0 && layer < k_cache.size(0), "hydra_fast.", op, ": layer must be in [0, L = ",
              k_cache.size(0), "), got ", layer);
  c::size(op, "cache_lens", cache_lens, 0, B, "B from qkv");
  auto check_norm = [&](const char* name, const std::optional<at::Tensor>& norm) {
    if (!norm.has_value()) return;
    c::same_device(op, name, *norm, "qkv", qkv);
    c::dims(op, name, *norm, 1, "[D]");
    c::same_dtype(op, name, *norm, "qkv", qkv);
    c::size(op, name, *norm, 0, D, "D from cos");
    c::last_dim_contiguous(op, name, *norm);
  };
  check_norm("q_norm", q_norm);
  check_norm("k_norm", k_norm);
  TORCH_CHECK(eps >= 0, "hydra_fast.", op, ": eps must be >= 0, got ", eps);
  c::last_dim_contiguous(op, "qkv", qkv);
  c::last_dim_contiguous(op, "cos", cos);
  c::last_dim_contiguous(op, "sin", sin);
  c::last_dim_contiguous(op, "k_cache", k_cache);
  c::last_dim_contiguous(op, "v_cache", v_cache);
}

// probs float32 [B, N, V], candidates int64 [B, N], first_child / next_sibling int64 [N] or [B, N] (both the
// same shape), uniform float32 [B, N], max_depth >= 0.
inline void check_accept_sample(const at::Tensor& probs, const at::Tensor& candidates, const at::Tensor& first_child,
                                const at::Tensor& next_sibling, const at::Tensor& uniform, int64_t max_depth) {
  namespace c = checks_detail;
  const char* op = "accept_sample";
  c::same_device(op, "candidates", candidates, "probs", probs);
  c::same_device(op, "first_child", first_child, "probs", probs);
  c::same_device(op, "next_sibling", next_sibling, "probs", probs);
  c::same_device(op, "uniform", uniform, "probs", probs);
  c::dims(op, "probs", probs, 3, "[B, N, V]");
  c::dims(op, "candidates", candidates, 2, "[B, N]");
  c::dims(op, "uniform", uniform, 2, "[B, N]");
  TORCH_CHECK(probs.scalar_type() == at::kFloat, "hydra_fast.", op, ": probs must be float32 probabilities (softmax "
              "of the filtered logits / temperature), got ", probs.scalar_type());
  c::dtype(op, "candidates", candidates, at::kLong);
  c::dtype(op, "first_child", first_child, at::kLong);
  c::dtype(op, "next_sibling", next_sibling, at::kLong);
  c::dtype(op, "uniform", uniform, at::kFloat);
  const int64_t B = probs.size(0), N = probs.size(1);
  c::tree_dims(op, "first_child", first_child, 1, "[N]", "[B, N]", B, "B from probs");
  c::size(op, "first_child", first_child, first_child.dim() - 1, N, "N from probs");
  TORCH_CHECK(next_sibling.sizes() == first_child.sizes(), "hydra_fast.", op,
              ": next_sibling must have first_child's shape ", first_child.sizes(), ", got ", next_sibling.sizes());
  c::size(op, "candidates", candidates, 0, B, "B from probs");
  c::size(op, "candidates", candidates, 1, N, "N from probs");
  c::size(op, "uniform", uniform, 0, B, "B from probs");
  c::size(op, "uniform", uniform, 1, N, "N from probs (one uniform per node, [b, 0] for the bonus token)");
  TORCH_CHECK(N >= 1, "hydra_fast.", op, ": probs must have at least one node (N >= 1), got N = 0");
  TORCH_CHECK(probs.size(2) >= 1, "hydra_fast.", op, ": probs must have a vocabulary (V >= 1), got V = 0");
  TORCH_CHECK(max_depth >= 0 && max_depth < N, "hydra_fast.", op, ": max_depth must be in [0, N) (the tree's depth, "
              "TreeBuffers.max_depth), got ", max_depth, " with N = ", N);
  c::last_dim_contiguous(op, "probs", probs);
}

// score float32 [B, C], parent int64 [B, C] (values in -1 .. C - 1: the caller's contract), candidate_depth int64
// [C], 1 <= nodes <= C, context_len >= 0, max_depth >= max(1, context_len).
inline void check_dynamic_tree_layout(const at::Tensor& score, const at::Tensor& parent,
                                      const at::Tensor& candidate_depth, int64_t nodes, int64_t context_len,
                                      int64_t max_depth) {
  namespace c = checks_detail;
  const char* op = "dynamic_tree_layout";
  c::same_device(op, "parent", parent, "score", score);
  c::same_device(op, "candidate_depth", candidate_depth, "score", score);
  c::dims(op, "score", score, 2, "[B, C]");
  c::dims(op, "parent", parent, 2, "[B, C]");
  c::dims(op, "candidate_depth", candidate_depth, 1, "[C]");
  TORCH_CHECK(score.scalar_type() == at::kFloat, "hydra_fast.", op, ": score must be float32 (cumulative draft "
              "log-probabilities), got ", score.scalar_type());
  c::dtype(op, "parent", parent, at::kLong);
  c::dtype(op, "candidate_depth", candidate_depth, at::kLong);
  const int64_t C = score.size(1);
  c::size(op, "parent", parent, 0, score.size(0), "B from score");
  c::size(op, "parent", parent, 1, C, "C from score");
  c::size(op, "candidate_depth", candidate_depth, 0, C, "C from score");
  TORCH_CHECK(nodes >= 1 && nodes <= C, "hydra_fast.", op, ": nodes must be in [1, C = ", C,
              "] (the candidates kept out of the C drafted), got ", nodes);
  TORCH_CHECK(context_len >= 0, "hydra_fast.", op, ": context_len must be >= 0, got ", context_len);
  TORCH_CHECK(max_depth >= 1 && max_depth >= context_len, "hydra_fast.", op,
              ": max_depth must be >= 1 and >= context_len (", context_len, ", the context chain's deepest node), "
              "got ", max_depth);
}

// x [..., V] (float dtype, V >= 1; leading dims may be empty), 1 <= k <= V. Returns x's rows as one run of equally
// spaced rows with a contiguous last dim (what x.view(-1, V) gives), or nullopt when x has no such layout: the
// kernels then read x.contiguous().
inline std::optional<RowLayout> check_topk_rows(const at::Tensor& x, int64_t k) {
  namespace c = checks_detail;
  const char* op = "topk_rows";
  TORCH_CHECK(x.dim() >= 1, "hydra_fast.", op, ": x must have at least 1 dim [..., V], got a 0-dim tensor");
  c::float_dtype(op, "x", x);
  const int64_t V = x.size(-1);
  TORCH_CHECK(V >= 1, "hydra_fast.", op, ": x's last dim V must be >= 1, got 0");
  TORCH_CHECK(k >= 1 && k <= V, "hydra_fast.", op, ": k must be in [1, V = ", V, "] (x's last dim), got ", k);
  const int64_t rows = x.numel() / V;
  if (rows == 0) return RowLayout{0, V};
  const auto strides = at::detail::computeStride(x.sizes(), x.strides(), at::IntArrayRef{rows, V});
  if (!strides.has_value() || (V > 1 && (*strides)[1] != 1)) return std::nullopt;
  return RowLayout{rows, (*strides)[0]};
}

}  // namespace hydra_fast

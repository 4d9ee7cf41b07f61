// The one place every hydra_fast op schema is declared. Kernels register implementations per dispatch key
// in csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu; python/hydra_fast/ops.py documents shapes and registers the
// fake (meta) kernels; python/hydra_fast/reference.py is the pure-PyTorch specification of each op.
#include <torch/library.h>

TORCH_LIBRARY(hydra_fast, m) {
  // q [B, Hq, N, D], k_cache/v_cache [B, Hkv, S, D], cache_lens int32 [B], tree_mask bool [N, N] (one tree for
  // the batch) or [B, N, N] (one per sequence) -> out [B, N, Hq, D]. Query i of sequence b sees cache positions
  // [0, len) and len + j where tree_mask[i, j] (tree_mask[b, i, j]).
  m.def("tree_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_lens, Tensor tree_mask, "
        "float scale) -> Tensor");
  // hidden [R, d], path_tokens int64 [R, k], embed [V, d], weights[0] [d, (k+1)d], weights[i>0] [d, d],
  // biases[i] [d], res_weight/res_bias: the first block's learned residual (required iff k > 0) -> [R, d]
  m.def("draft_head_mlp(Tensor hidden, Tensor path_tokens, Tensor embed, Tensor[] weights, Tensor[] biases, "
        "Tensor? res_weight, Tensor? res_bias) -> Tensor");
  // logits [B, N, V], candidates int64 [B, N], paths int64 [P, L] (-1 padded, paths[:, 0] == 0) or [B, P, L]
  // (one tree per sequence) -> (accept_len int64 [B], out_tokens int64 [B, L], accepted_nodes int64 [B, L])
  m.def("accept_greedy(Tensor logits, Tensor candidates, Tensor paths) -> (Tensor, Tensor, Tensor)");
  // as accept_greedy, plus uniform float32 [B] in [0, 1) for the extra token's inverse-CDF draw
  m.def("accept_typical(Tensor logits, Tensor candidates, Tensor paths, Tensor uniform, float temperature, "
        "float posterior_threshold, float posterior_alpha) -> (Tensor, Tensor, Tensor)");
  // k_cache/v_cache [L, B, Hkv, S, D] (all layers), cache_lens int32 [B], accepted_nodes int64 [B, Lp]
  m.def("kv_compact(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cache_lens, Tensor accepted_nodes) -> ()");
  // The fused decoder-layer ops (python/hydra_fast/fastpath.py), in HF's rounding order (see reference.py).
  // x [..., d], weight [d] -> [..., d]
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  // x, residual [..., d], weight [d] -> (rms_norm(x + residual) [..., d], x + residual [..., d])
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  // x [..., 2I] (gate | up) -> silu(gate) * up [..., I]
  m.def("silu_mul(Tensor x) -> Tensor");
  // qkv [B, N, (Hq + 2 Hkv) D], cos/sin [B, N, D], k_cache/v_cache [L, B, Hkv, S, D], cache_lens int32 [B],
  // q_norm/k_norm [D] -> q [B, N, Hq, D]; K and V of token n go to cache[layer, b, :, cache_lens[b] + n] (< S).
  m.def("rope_kv_write(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, int layer, "
        "Tensor cache_lens, int num_q_heads, int num_kv_heads, Tensor? q_norm, Tensor? k_norm, float eps) -> Tensor");
  // The fused linear ops: the decoder layer's elementwise step, then a projection x @ weight.T + bias (weight
  // [N, K], bias [N]); on CUDA one GEMV kernel for a few rows. x [..., K] -> [..., N]
  m.def("linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  // linear(rms_norm(x, norm_weight, eps), weight, bias)
  m.def("rms_norm_linear(Tensor x, Tensor norm_weight, float eps, Tensor weight, Tensor? bias) -> Tensor");
  // (linear(rms_norm(x + residual), weight, bias), x + residual); silu_mul: weight is gate | up [2I, K] and the
  // first output is silu_mul of the product [..., I] (the MLP's activation)
  m.def("add_rms_norm_linear(Tensor x, Tensor residual, Tensor norm_weight, float eps, Tensor weight, Tensor? bias, "
        "bool silu_mul=False) -> (Tensor, Tensor)");
  // probs float32 [B, N, V] (target distributions), candidates int64 [B, N], first_child / next_sibling int64 [N]
  // or [B, N] (one tree per sequence; children in the order they are tried, -1 terminated), uniform float32
  // [B, N] -> as accept_greedy with L = max_depth + 1. Lossless sampling: point-mass multi-round rejection
  // (reference.accept_sample).
  m.def("accept_sample(Tensor probs, Tensor candidates, Tensor first_child, Tensor next_sibling, Tensor uniform, "
        "int max_depth) -> (Tensor, Tensor, Tensor)");
  // score float32 [B, C], parent int64 [B, C] (-1: the root), candidate_depth int64 [C] -> (kept int64 [B, nodes],
  // paths int64 [B, N, L], tree_mask bool [B, N, N], depth int64 [B, N], first_child / next_sibling int64 [B, N]),
  // N = 1 + nodes + context_len, L = max_depth + 1: the dynamic draft tree's layout (reference.dynamic_tree_layout;
  // kept = the top `nodes` by score, ties to the lower candidate index).
  m.def("dynamic_tree_layout(Tensor score, Tensor parent, Tensor candidate_depth, int nodes, int context_len, "
        "int max_depth) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // x [..., V] (float dtype), 1 <= k <= V -> (values [..., k] in x's dtype, indices int64 [..., k]): each row's k
  // largest, by value descending, ties to the lower index, NaN above every number (reference.topk_rows).
  m.def("topk_rows(Tensor x, int k) -> (Tensor, Tensor)");
}

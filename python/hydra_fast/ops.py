"""Typed wrappers of the compiled ops ``torch.ops.hydra_fast.*`` and their fake (meta) kernels.

Shapes are documented on each wrapper; ``reference.py`` holds the same functions in pure PyTorch and is
the specification. The fake kernels let every op run under ``torch.compile(fullgraph=True)``.
"""
from __future__ import annotations

import os

import torch

from hydra_fast import reference


try:  # importing the module registers the ops (TORCH_LIBRARY in csrc/ops.cpp)
    from hydra_fast import _C as _EXTENSION
except ImportError:
    _EXTENSION = None


def _extension():
    """hydra_fast._C, or None when the extension was not built (or was built from older sources)."""
    return _EXTENSION


def extension_loaded() -> bool:
    return _extension() is not None


def build_info() -> dict:
    """What was compiled: {'cuda': bool, 'cuda_archs': str, 'torch_version': str, ...}."""
    ext = _extension()
    if ext is None:
        return {"extension": False, "cuda": False, "reason": _STALE or "hydra_fast._C is not built: run "
                "`pip install --no-build-isolation -e .` in the repository"}
    info = dict(ext.build_info())
    info["extension"] = True
    info["runtime_torch_version"] = torch.__version__
    return info


def has_kernels(device: torch.device | str) -> bool:
    """True when the compiled extension has kernels for ``device``: cpu always; cuda if it was built with CUDA
    for this GPU's architecture (else False, with one warning: the reference ops run instead)."""
    device = torch.device(device)
    ext = _extension()
    if ext is None:
        return False
    if device.type == "cpu":
        return True
    info = ext.build_info()
    if device.type != "cuda" or not info["cuda"]:
        return False
    major, minor = torch.cuda.get_device_capability(device)
    return _built_for_arch(f"{major}{minor}", str(info.get("cuda_archs", "")))


def _built_for_arch(arch: str, built: str) -> bool:
    """Whether the CMake architecture list ``built`` ("90", "80,90", "90a", "90-real") has code for ``arch``."""
    archs = {a.split("-")[0].rstrip("af") for a in built.replace(";", ",").split(",") if a}
    if arch in archs:
        return True
    import warnings

    warnings.warn(f"hydra_fast._C has CUDA kernels for sm_{', sm_'.join(sorted(archs)) or '(none)'} only, not for "
                  f"this GPU (sm_{arch}): using the pure-PyTorch reference ops. Rebuild with "
                  f"HYDRA_FAST_CUDA_ARCHS=\"{';'.join(sorted(archs | {arch}))}\" for kernels on it", stacklevel=3)
    return False


def implementation(device: torch.device | str, prefer_kernels: bool = True):
    """The module whose functions implement the ops on ``device``: this one (kernels) or ``reference``."""
    return _Kernels if (prefer_kernels and has_kernels(device)) else reference


def _require():
    if _extension() is None:
        raise RuntimeError(_STALE or (
            "hydra_fast._C is not built. Run `pip install --no-build-isolation -e .` in the repository, or "
            "use hydra_fast.reference for the pure-PyTorch versions."))
    return torch.ops.hydra_fast


def tree_attention(q, k_cache, v_cache, cache_lens, tree_mask, scale: float) -> torch.Tensor:
    """Attention of each sequence's N newest tokens (a draft tree) over a static KV cache.

    q [B, Hq, N, D] (any strides), k_cache / v_cache [B, Hkv, S, D] with the tree's own K/V already at
    positions [len, len + N), cache_lens int32 [B] on q's device, tree_mask bool [N, N] (row i: the nodes
    query i may see, its ancestors and itself) shared by the batch, or [B, N, N] with one tree per sequence
    (tree_mask[b] is sequence b's), Hq a multiple of Hkv. Returns [B, N, Hq, D] in q's dtype.
    """
    return _require().tree_attention(q, k_cache, v_cache, cache_lens, tree_mask, scale)


def draft_head_mlp(hidden, path_tokens, embed, weights, biases, res_weight=None, res_bias=None) -> torch.Tensor:
    """The fused body of one draft head for R tree nodes.

    hidden [R, d], path_tokens int64 [R, k] (k >= 0), embed [V, d] (the base model's input embeddings),
    weights[0] [d, (k+1)d] and weights[i>0] [d, d], biases[i] [d], res_weight [d, (k+1)d] and res_bias [d]
    (the learned residual of the first block; required when k > 0). Block: x <- res(x) + silu(W x + b).
    Returns [R, d].
    """
    return _require().draft_head_mlp(hidden, path_tokens, embed, list(weights), list(biases), res_weight, res_bias)


def accept_greedy(logits, candidates, paths):
    """Greedy tree acceptance.

    logits [B, N, V], candidates int64 [B, N] (node 0 is the root), paths int64 [P, L] root-to-leaf node
    indices, -1 padded, one tree for the batch; or [B, P, L], one tree per sequence (paths[b] is sequence b's,
    its parents derived from its own paths; trees of different sizes padded with -1 entries and with root-only
    paths [0, -1, ...] after the real ones). Returns accept_len int64 [B] (accepted drafts a; a + 1 tokens are
    emitted), out_tokens int64 [B, L] (the a accepted tokens, then the base model's next token, then -1) and
    accepted_nodes int64 [B, L] (root and accepted nodes, then -1). Ties: the lowest path index.
    """
    return _require().accept_greedy(logits, candidates, paths)


def accept_typical(logits, candidates, paths, uniform, temperature: float, posterior_threshold: float = 0.09,
                   posterior_alpha: float = 0.3):
    """Typical acceptance: a token x is accepted if p(x) > min(eps, delta * exp(-H(p))), p = softmax(l / T).

    As accept_greedy plus uniform float32 [B] in [0, 1): the extra token is the inverse-CDF draw of p at the
    last accepted node. Equally long paths: higher total log-probability wins, then the lower index.
    """
    return _require().accept_typical(logits, candidates, paths, uniform, temperature, posterior_threshold,
                                     posterior_alpha)


def accept_sample(probs, candidates, first_child, next_sibling, uniform, max_depth: int):
    """Lossless sampling on the tree: point-mass multi-round rejection against the target (exact for
    deterministic child lists; see reference.accept_sample for the rule and why it is exact).

    probs float32 [B, N, V] (each node's target distribution, already temperature-scaled and top-k/top-p
    filtered; rows are used as p / sum p), candidates int64 [B, N], first_child / next_sibling int64 [N] (each
    node's children in the order they are tried, -1 terminated: TreeBuffers.first_child / next_sibling), or
    both [B, N] with one tree per sequence, uniform float32 [B, N] in [0, 1) ([b, n] decides node n's test,
    [b, 0] draws the bonus token), max_depth the tree's depth (the deepest sequence's, for trees per sequence).
    Returns as accept_greedy with L = max_depth + 1.
    """
    return _require().accept_sample(probs, candidates, first_child, next_sibling, uniform, max_depth)


def kv_compact(k_cache, v_cache, cache_lens, accepted_nodes) -> None:
    """Move accepted tree slots to contiguous positions after len, in place, for all layers at once.

    k_cache / v_cache [L, B, Hkv, S, D], cache_lens int32 [B] (length before the tree), accepted_nodes
    int64 [B, Lp] (-1 padded): slot len + accepted_nodes[b, j] moves to len + j.
    """
    _require().kv_compact(k_cache, v_cache, cache_lens, accepted_nodes)


def rms_norm(x, weight, eps: float) -> torch.Tensor:
    """RMSNorm in HF's rounding order: weight * (x * rsqrt(mean(x^2) + eps)) with the mean square in fp32.

    x [..., d] (last dim contiguous; leading dims any run of equally spaced rows), weight [d] in x's dtype.
    Returns a contiguous [..., d] in x's dtype.
    """
    return _require().rms_norm(x, weight, eps)


def add_rms_norm(x, residual, weight, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the next RMSNorm in one pass.

    x, residual [..., d] (same shape and dtype), weight [d]. Returns (rms_norm(h) [..., d], h [..., d]) with
    h = x + residual rounded to the dtype (the new residual stream), both contiguous.
    """
    return _require().add_rms_norm(x, residual, weight, eps)


def silu_mul(x) -> torch.Tensor:
    """SiLU-and-multiply of the fused gate|up projection: x [..., 2I] -> silu(x[..., :I]) * x[..., I:] [..., I]."""
    return _require().silu_mul(x)


def rope_kv_write(qkv, cos, sin, k_cache, v_cache, layer: int, cache_lens, num_q_heads: int, num_kv_heads: int,
                  q_norm, k_norm, eps: float) -> torch.Tensor:
    """Split the fused q|k|v projection, rotate q and k, and write k and v into one layer of the KV cache.

    qkv [B, N, (Hq + 2 Hkv) D], cos / sin [B, N, D] (the rotary embedding at each token's position, in qkv's
    dtype), k_cache / v_cache [L, B, Hkv, S, D] (modified in place at layer `layer`), cache_lens int32 [B]
    (token n of sequence b goes to slot cache_lens[b] + n; slots >= S are not written), q_norm / k_norm [D] or
    None (Qwen3's per-head RMSNorm before RoPE, with eps). Returns q [B, N, Hq, D] after norm and RoPE.
    """
    return _require().rope_kv_write(qkv, cos, sin, k_cache, v_cache, layer, cache_lens, num_q_heads, num_kv_heads,
                                    q_norm, k_norm, eps)


def linear(x, weight, bias=None) -> torch.Tensor:
    """x [..., K] @ weight [N, K].T + bias [N] -> [..., N] contiguous (leading dims of x: one run of equally spaced
    rows, last dim contiguous). On CUDA one GEMV kernel for up to 8 rows (16-byte aligned rows, K x rows x
    element size <= 48 KB), else cuBLAS; the GEMV sums in another order than cuBLAS (equal to fp32 rounding)."""
    return _require().linear(x, weight, bias)


def rms_norm_linear(x, norm_weight, eps: float, weight, bias=None) -> torch.Tensor:
    """linear(rms_norm(x, norm_weight, eps), weight, bias): x [..., K] -> [..., N]. On CUDA for a few rows (as
    ``linear``) the norm is the GEMV's prologue: one kernel instead of two."""
    return _require().rms_norm_linear(x, norm_weight, eps, weight, bias)


def add_rms_norm_linear(x, residual, norm_weight, eps: float, weight, bias=None,
                        silu_mul: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """add_rms_norm then linear: x, residual [..., K] -> (linear(rms_norm(x + residual)) [..., N], x + residual
    [..., K], the new residual stream). ``silu_mul``: weight is the MLP's gate | up [2I, K] and the first output is
    silu_mul of the product [..., I]. One kernel on CUDA for a few rows (as ``linear``)."""
    return _require().add_rms_norm_linear(x, residual, norm_weight, eps, weight, bias, silu_mul)


def dynamic_tree_layout(score, parent, candidate_depth, nodes: int, context_len: int, max_depth: int):
    """A dynamic draft tree's layout in one op (``hydra_fast.dynamic_tree``).

    score float32 [B, C] (cumulative draft log-probability, strictly falling along every path), parent int64
    [B, C] (each candidate's parent candidate, -1 for the root's children), candidate_depth int64 [C]. Keeps the
    ``nodes`` best candidates by score (ties: the lower candidate index) and lays them out after the root in
    candidate order, then a chain of ``context_len`` nodes off the root. Returns (kept int64 [B, nodes], paths
    int64 [B, N, L] (-1 padded), tree_mask bool [B, N, N], depth int64 [B, N], first_child int64 [B, N],
    next_sibling int64 [B, N]) with N = 1 + nodes + context_len, L = max_depth + 1. CUDA: C <= 8192, N <= 512.
    """
    return _require().dynamic_tree_layout(score, parent, candidate_depth, nodes, context_len, max_depth)


def topk_rows(x, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's k largest values: x [..., V] (float32/float16/bfloat16), 1 <= k <= V -> (values [..., k] in x's
    dtype, indices int64 [..., k]), by value descending, ties to the lower index, NaN above every number (the
    order of a stable descending sort). CUDA: one CTA per row for k <= 32, else a sort of exact order keys."""
    return _require().topk_rows(x, k)


# The draft's top-k rows go to ``topk_rows`` (one CTA a row) on CUDA when they are at most this wide and k is at
# most TOPK_ROWS_MAX_K (the kernel's register path); otherwise to torch.topk, which spreads a row over many CTAs.
# From bench_ops' topk_rows cases on the H200 (bench/RESULTS.md, 2026-12-02), bf16 rows, ours against torch.topk:
# 6,592 columns 4-14 us against 24-38 us; 16,384: 24 against 70 us; 32,768: 41 against 43 us; 49,152 with 10 rows
# and k = 10: 58 against 45 us; k = 40 (the kernel's sort path): 144 against 35 us. HYDRA_FAST_TOPK_ROWS=0:
# torch.topk always.
TOPK_ROWS_MAX_WIDTH = 16384
TOPK_ROWS_MAX_K = 32
TOPK_ROWS_ON = os.environ.get("HYDRA_FAST_TOPK_ROWS", "1") != "0"


def row_topk(x, k: int, impl=reference) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's k largest (values [..., k], indices int64 [..., k]) for the draft heads: ``topk_rows`` where the
    kernels run (impl is this module's ``_Kernels``), on CUDA, for rows up to ``TOPK_ROWS_MAX_WIDTH`` columns and
    k up to ``TOPK_ROWS_MAX_K``; torch.topk otherwise. Both order by value descending; ties may differ, which can
    change the drafts, never the output."""
    if (impl is _Kernels and TOPK_ROWS_ON and x.is_cuda and x.shape[-1] <= TOPK_ROWS_MAX_WIDTH
            and k <= TOPK_ROWS_MAX_K):
        return topk_rows(x, k)
    values, indices = torch.topk(x, k, dim=-1)
    return values, indices


class _Kernels:
    """The compiled ops under the reference module's names (see ``implementation``)."""

    tree_attention = staticmethod(tree_attention)
    draft_head_mlp = staticmethod(draft_head_mlp)
    accept_greedy = staticmethod(accept_greedy)
    accept_typical = staticmethod(accept_typical)
    accept_sample = staticmethod(accept_sample)
    kv_compact = staticmethod(kv_compact)
    rms_norm = staticmethod(rms_norm)
    add_rms_norm = staticmethod(add_rms_norm)
    silu_mul = staticmethod(silu_mul)
    rope_kv_write = staticmethod(rope_kv_write)
    dynamic_tree_layout = staticmethod(dynamic_tree_layout)
    linear = staticmethod(linear)
    rms_norm_linear = staticmethod(rms_norm_linear)
    add_rms_norm_linear = staticmethod(add_rms_norm_linear)
    topk_rows = staticmethod(topk_rows)


# Every op this package calls (``_Kernels``): an extension built from older sources lacks some, and is then not used.
OP_NAMES = tuple(name for name in vars(_Kernels) if not name.startswith("_"))


def stale_reason(names=OP_NAMES) -> str | None:
    """Why the loaded extension cannot serve this package (ops it lacks: built from older sources), or None."""
    missing = [n for n in names if not hasattr(torch.ops.hydra_fast, n)]
    if not missing:
        return None
    return (f"hydra_fast._C was built from older sources: it lacks the op(s) {', '.join(missing)}; the pure-PyTorch "
            "reference ops run instead. Rebuild it: `pip install --no-build-isolation -e .` in the repository")


_STALE = stale_reason() if _EXTENSION is not None else None
if _STALE is not None:
    import warnings

    warnings.warn(_STALE, stacklevel=2)
    _EXTENSION = None


def _register_fakes() -> None:
    lib = "hydra_fast::"

    @torch.library.register_fake(lib + "tree_attention")
    def _(q, k_cache, v_cache, cache_lens, tree_mask, scale):
        B, Hq, N, D = q.shape
        return q.new_empty((B, N, Hq, D))

    @torch.library.register_fake(lib + "draft_head_mlp")
    def _(hidden, path_tokens, embed, weights, biases, res_weight, res_bias):
        return hidden.new_empty((hidden.shape[0], weights[-1].shape[0]))

    def _accept_fake(logits, paths):
        B = logits.shape[0]
        L = paths.shape[-1]  # paths [P, L] or [B, P, L]
        i64 = dict(dtype=torch.long, device=logits.device)
        return logits.new_empty((B,), **i64), logits.new_empty((B, L), **i64), logits.new_empty((B, L), **i64)

    @torch.library.register_fake(lib + "accept_greedy")
    def _(logits, candidates, paths):
        return _accept_fake(logits, paths)

    @torch.library.register_fake(lib + "accept_typical")
    def _(logits, candidates, paths, uniform, temperature, posterior_threshold, posterior_alpha):
        return _accept_fake(logits, paths)

    @torch.library.register_fake(lib + "accept_sample")
    def _(probs, candidates, first_child, next_sibling, uniform, max_depth):
        B = probs.shape[0]
        i64 = dict(dtype=torch.long, device=probs.device)
        L = max_depth + 1
        return probs.new_empty((B,), **i64), probs.new_empty((B, L), **i64), probs.new_empty((B, L), **i64)

    @torch.library.register_fake(lib + "kv_compact")
    def _(k_cache, v_cache, cache_lens, accepted_nodes):
        return None

    @torch.library.register_fake(lib + "rms_norm")
    def _(x, weight, eps):
        return x.new_empty(x.shape)

    @torch.library.register_fake(lib + "add_rms_norm")
    def _(x, residual, weight, eps):
        return x.new_empty(x.shape), x.new_empty(x.shape)

    @torch.library.register_fake(lib + "silu_mul")
    def _(x):
        return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))

    @torch.library.register_fake(lib + "rope_kv_write")
    def _(qkv, cos, sin, k_cache, v_cache, layer, cache_lens, num_q_heads, num_kv_heads, q_norm, k_norm, eps):
        B, N = qkv.shape[:2]
        return qkv.new_empty((B, N, num_q_heads, cos.shape[-1]))

    def _projected(x, weight):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    @torch.library.register_fake(lib + "linear")
    def _(x, weight, bias):
        return _projected(x, weight)

    @torch.library.register_fake(lib + "rms_norm_linear")
    def _(x, norm_weight, eps, weight, bias):
        return _projected(x, weight)

    @torch.library.register_fake(lib + "add_rms_norm_linear")
    def _(x, residual, norm_weight, eps, weight, bias, silu_mul=False):
        width = weight.shape[0] // 2 if silu_mul else weight.shape[0]
        return x.new_empty((*x.shape[:-1], width)), x.new_empty(x.shape)

    @torch.library.register_fake(lib + "dynamic_tree_layout")
    def _(score, parent, candidate_depth, nodes, context_len, max_depth):
        B = score.shape[0]
        N, L = 1 + nodes + context_len, max_depth + 1
        i64 = dict(dtype=torch.long)
        return (score.new_empty((B, nodes), **i64), score.new_empty((B, N, L), **i64),
                score.new_empty((B, N, N), dtype=torch.bool), score.new_empty((B, N), **i64),
                score.new_empty((B, N), **i64), score.new_empty((B, N), **i64))

    @torch.library.register_fake(lib + "topk_rows")
    def _(x, k):
        torch._check(1 <= k <= x.shape[-1], lambda: f"hydra_fast.topk_rows: k must be in [1, V = {x.shape[-1]}], "
                     f"got {k}")
        shape = (*x.shape[:-1], k)
        return x.new_empty(shape), x.new_empty(shape, dtype=torch.long)


if _EXTENSION is not None:
    _register_fakes()

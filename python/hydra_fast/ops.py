"""Typed wrappers of the compiled ops ``torch.ops.hydra_fast.*`` and their fake (meta) kernels.

Shapes are documented on each wrapper; ``reference.py`` holds the same functions in pure PyTorch and is
the specification. The fake kernels let every op run under ``torch.compile(fullgraph=True)``.
"""
from __future__ import annotations

import torch

from hydra_fast import reference


try:  # importing the module registers the ops (TORCH_LIBRARY in csrc/ops.cpp)
    from hydra_fast import _C as _EXTENSION
except ImportError:
    _EXTENSION = None


def _extension():
    """hydra_fast._C, or None when the extension was not built."""
    return _EXTENSION


def extension_loaded() -> bool:
    return _extension() is not None


def build_info() -> dict:
    """What was compiled: {'cuda': bool, 'cuda_archs': str, 'torch_version': str, ...}."""
    ext = _extension()
    if ext is None:
        return {"extension": False, "cuda": False, "reason": "hydra_fast._C is not built: run "
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
        raise RuntimeError(
            "hydra_fast._C is not built. Run `pip install --no-build-isolation -e .` in the repository, or "
            "use hydra_fast.reference for the pure-PyTorch versions."
        )
    return torch.ops.hydra_fast


def tree_attention(q, k_cache, v_cache, cache_lens, tree_mask, scale: float) -> torch.Tensor:
    """Attention of each sequence's N newest tokens (a draft tree) over a static KV cache.

    q [B, Hq, N, D] (any strides), k_cache / v_cache [B, Hkv, S, D] with the tree's own K/V already at
    positions [len, len + N), cache_lens int32 [B] on q's device, tree_mask bool [N, N] (row i: the nodes
    query i may see, its ancestors and itself), Hq a multiple of Hkv. Returns [B, N, Hq, D] in q's dtype.
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
    indices, -1 padded. Returns accept_len int64 [B] (accepted drafts a; a + 1 tokens are emitted),
    out_tokens int64 [B, L] (the a accepted tokens, then the base model's next token, then -1) and
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


def kv_compact(k_cache, v_cache, cache_lens, accepted_nodes) -> None:
    """Move accepted tree slots to contiguous positions after len, in place, for all layers at once.

    k_cache / v_cache [L, B, Hkv, S, D], cache_lens int32 [B] (length before the tree), accepted_nodes
    int64 [B, Lp] (-1 padded): slot len + accepted_nodes[b, j] moves to len + j.
    """
    _require().kv_compact(k_cache, v_cache, cache_lens, accepted_nodes)


class _Kernels:
    """The compiled ops under the reference module's names (see ``implementation``)."""

    tree_attention = staticmethod(tree_attention)
    draft_head_mlp = staticmethod(draft_head_mlp)
    accept_greedy = staticmethod(accept_greedy)
    accept_typical = staticmethod(accept_typical)
    kv_compact = staticmethod(kv_compact)


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
        L = paths.shape[1]
        i64 = dict(dtype=torch.long, device=logits.device)
        return logits.new_empty((B,), **i64), logits.new_empty((B, L), **i64), logits.new_empty((B, L), **i64)

    @torch.library.register_fake(lib + "accept_greedy")
    def _(logits, candidates, paths):
        return _accept_fake(logits, paths)

    @torch.library.register_fake(lib + "accept_typical")
    def _(logits, candidates, paths, uniform, temperature, posterior_threshold, posterior_alpha):
        return _accept_fake(logits, paths)

    @torch.library.register_fake(lib + "kv_compact")
    def _(k_cache, v_cache, cache_lens, accepted_nodes):
        return None


if _EXTENSION is not None:
    _register_fakes()

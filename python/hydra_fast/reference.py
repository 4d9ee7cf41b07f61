"""The specification: a pure-PyTorch twin of every hydra_fast op, same name and signature as ``ops.py``.

Each function is written for clarity, not speed. The C++/CUDA kernels are tested against these, and the
decoding engine can run on them (``ops.use_reference(True)``) where the extension is not built.
None of them reads a value back to the host or produces a data-dependent shape.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def tree_attention(
    q: torch.Tensor,  # [B, Hq, N, D]
    k_cache: torch.Tensor,  # [B, Hkv, S, D]
    v_cache: torch.Tensor,  # [B, Hkv, S, D]
    cache_lens: torch.Tensor,  # int32 [B]
    tree_mask: torch.Tensor,  # bool [N, N] (one tree for the batch) or [B, N, N] (one per sequence)
    scale: float,
) -> torch.Tensor:  # [B, N, Hq, D]
    B, Hq, N, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    group = Hq // Hkv
    pos = torch.arange(S, device=q.device)  # [S]
    lens = cache_lens.to(torch.long).view(B, 1, 1)  # [B, 1, 1]
    rel = pos.view(1, 1, S) - lens  # [B, 1, S] position relative to the tree's first slot
    in_cache = rel < 0  # [B, 1, S]
    in_tree = (rel >= 0) & (rel < N)  # [B, 1, S]
    tree_cols = rel.clamp(0, N - 1).expand(B, N, S)  # [B, N, S]
    tree_ok = torch.gather(tree_mask.to(torch.bool).expand(B, N, N), 2, tree_cols)  # [B, N, S]
    allowed = in_cache | (in_tree & tree_ok)  # [B, N, S]
    k = k_cache.float().repeat_interleave(group, dim=1)  # [B, Hq, S, D]
    v = v_cache.float().repeat_interleave(group, dim=1)  # [B, Hq, S, D]
    scores = torch.matmul(q.float(), k.transpose(-1, -2)) * scale  # [B, Hq, N, S]
    scores = scores.masked_fill(~allowed.unsqueeze(1), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, v)  # [B, Hq, N, D]
    return out.transpose(1, 2).contiguous().to(q.dtype)  # [B, N, Hq, D]


def draft_head_mlp(
    hidden: torch.Tensor,  # [R, d]
    path_tokens: torch.Tensor,  # int64 [R, k]
    embed: torch.Tensor,  # [V, d]
    weights: list[torch.Tensor],  # [d, (k+1)d], then [d, d] ...
    biases: list[torch.Tensor],  # [d] each
    res_weight: torch.Tensor | None,  # [d, (k+1)d] or None when k == 0
    res_bias: torch.Tensor | None,  # [d] or None
) -> torch.Tensor:  # [R, d]
    R, k = path_tokens.shape
    emb = embed[path_tokens.reshape(-1)].reshape(R, -1)  # [R, k*d]
    x = torch.cat([hidden, emb.to(hidden.dtype)], dim=-1)  # [R, (k+1)d]
    for i, (w, b) in enumerate(zip(weights, biases)):
        y = F.silu(F.linear(x, w, b))
        if i == 0 and res_weight is not None:
            x = F.linear(x, res_weight, res_bias) + y
        else:
            x = x + y
    return x


def _per_sequence(paths: torch.Tensor, batch: int) -> torch.Tensor:
    """paths [P, L] (one tree for the batch) or [B, P, L] (one per sequence) -> [B, P, L]."""
    return paths.expand(batch, *paths.shape[-2:])


def _node_values(values: torch.Tensor, paths: torch.Tensor) -> torch.Tensor:
    """values [B, N] at the nodes after the root of each sequence's paths [B, P, L] (-1 read as node 0). [B, P, L-1]"""
    B, P, L = paths.shape
    return torch.gather(values, 1, paths[:, :, 1:].clamp(min=0).reshape(B, P * (L - 1))).view(B, P, L - 1)


def _paths_accept(match: torch.Tensor, paths: torch.Tensor) -> torch.Tensor:
    """match [B, N] bool: node's token accepted given its parent; paths [B, P, L]. -> accepted drafts [B, P]."""
    node_ok = _node_values(match, paths) & (paths[:, :, 1:] >= 0)  # [B, P, L-1]
    return torch.cumprod(node_ok.to(torch.long), dim=-1).sum(-1)  # [B, P]


def _gather_outputs(paths, best, accept_len, candidates, extra):
    """Accepted node indices and tokens along each sequence's best path (paths [B, P, L]), -1 padded. [B, L] each."""
    B = best.shape[0]
    L = paths.shape[-1]
    j = torch.arange(L, device=paths.device).view(1, L)  # [1, L]
    path_nodes = paths[torch.arange(B, device=paths.device), best]  # [B, L]
    keep = j <= accept_len.view(B, 1)  # [B, L]
    accepted_nodes = torch.where(keep, path_nodes, torch.full_like(path_nodes, -1))
    next_nodes = path_nodes.roll(-1, dims=1).clamp(min=0)  # [B, L]: the node after position j
    drafted = torch.gather(candidates, 1, next_nodes)  # [B, L]
    out = torch.where(j < accept_len.view(B, 1), drafted, torch.full_like(drafted, -1))
    out = torch.where(j == accept_len.view(B, 1), extra.view(B, 1).expand(B, L), out)
    return accept_len, out, accepted_nodes


def accept_greedy(
    logits: torch.Tensor,  # [B, N, V]
    candidates: torch.Tensor,  # int64 [B, N]
    paths: torch.Tensor,  # int64 [P, L] (one tree for the batch) or [B, P, L] (one per sequence)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, N, _ = logits.shape
    paths = _per_sequence(paths, B)  # [B, P, L]
    argmax = logits.float().argmax(-1)  # [B, N]
    parents = _parents_from_paths(paths, N)  # [B, N]
    match = torch.gather(argmax, 1, parents.clamp(min=0)) == candidates  # [B, N]
    acc = _paths_accept(match, paths)  # [B, P]
    accept_len, best = acc.max(-1)  # first path of the longest accepted length
    last = _last_accepted(paths, best, accept_len)  # [B]
    extra = torch.gather(argmax, 1, last.view(B, 1)).view(B)
    return _gather_outputs(paths, best, accept_len, candidates, extra)


def _last_accepted(paths, best, accept_len):
    """The last accepted node of each sequence: paths[b, best[b], accept_len[b]]. [B]"""
    B = best.shape[0]
    return paths[torch.arange(B, device=paths.device), best, accept_len]


def accept_typical(
    logits: torch.Tensor,  # [B, N, V]
    candidates: torch.Tensor,  # int64 [B, N]
    paths: torch.Tensor,  # int64 [P, L] or [B, P, L]
    uniform: torch.Tensor,  # float32 [B]
    temperature: float,
    posterior_threshold: float,
    posterior_alpha: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, N, V = logits.shape
    paths = _per_sequence(paths, B)  # [B, P, L]
    logp = torch.log_softmax(logits.double() / temperature, dim=-1)  # [B, N, V]
    p = logp.exp()
    entropy = -(p * logp).nan_to_num(0.0).sum(-1)  # [B, N]; 0 * log 0 counts as 0
    threshold = torch.clamp(posterior_alpha * torch.exp(-entropy), max=posterior_threshold)  # [B, N]
    par = _parents_from_paths(paths, N).clamp(min=0)  # [B, N]
    rows = torch.arange(B, device=logits.device).view(B, 1)
    cand_logp = logp[rows, par, candidates]  # [B, N] log-prob of each node's token under its parent
    match = cand_logp.exp() > torch.gather(threshold, 1, par)  # [B, N]
    acc = _paths_accept(match, paths)  # [B, P]
    L = paths.shape[-1]
    j = torch.arange(1, L, device=paths.device).view(1, 1, L - 1)
    node_lp = _node_values(cand_logp, paths)  # [B, P, L-1]
    score = torch.where(j <= acc.unsqueeze(-1), node_lp, torch.zeros_like(node_lp)).sum(-1)  # [B, P]
    # longest path first, then highest total log-probability, then lowest index
    key = acc.double() * 1e6 + score
    best = key.argmax(-1)  # [B]
    accept_len = torch.gather(acc, 1, best.view(B, 1)).view(B)
    last = _last_accepted(paths, best, accept_len)  # [B]
    last_p = torch.gather(p, 1, last.view(B, 1, 1).expand(B, 1, V)).view(B, V)  # [B, V]
    cdf = last_p.cumsum(-1)  # [B, V]
    target = uniform.double().view(B, 1) * cdf[:, -1:]
    extra = (cdf <= target).sum(-1).clamp(max=V - 1)  # first index whose cdf exceeds u * total
    return _gather_outputs(paths, best, accept_len, candidates, extra)


def _parents_from_paths(paths: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """Parent of each node (-1 for the root) from root-to-leaf paths: [P, L] -> [N], per sequence
    [B, P, L] -> [B, N] (each row from its own paths)."""
    lead = paths.shape[:-2]
    child = paths[..., 1:].reshape(*lead, -1)
    parent = paths[..., :-1].reshape(*lead, -1)
    ok = child >= 0
    # every (parent, child) pair along a path; scatter is deterministic since a child has one parent
    idx = torch.where(ok, child, torch.full_like(child, num_nodes))
    buf = torch.full((*lead, num_nodes + 1), -1, dtype=torch.long, device=paths.device)
    buf.scatter_(-1, idx, torch.where(ok, parent, torch.full_like(parent, -1)))
    return buf[..., :num_nodes].clone()


def kv_compact(
    k_cache: torch.Tensor,  # [L, B, Hkv, S, D], modified in place
    v_cache: torch.Tensor,  # [L, B, Hkv, S, D], modified in place
    cache_lens: torch.Tensor,  # int32 [B]
    accepted_nodes: torch.Tensor,  # int64 [B, Lp], -1 padded
) -> None:
    B, Lp = accepted_nodes.shape
    S = k_cache.shape[3]
    lens = cache_lens.to(torch.long).view(B, 1)  # [B, 1]
    j = torch.arange(Lp, device=accepted_nodes.device).view(1, Lp)
    valid = accepted_nodes >= 0  # [B, Lp]
    src = torch.where(valid, lens + accepted_nodes, lens + j).clamp(max=S - 1)  # [B, Lp]
    dst = (lens + j).clamp(max=S - 1)  # [B, Lp]
    for cache in (k_cache, v_cache):
        Lyr, _, H, _, D = cache.shape
        src_i = src.view(1, B, 1, Lp, 1).expand(Lyr, B, H, Lp, D)
        dst_i = dst.view(1, B, 1, Lp, 1).expand(Lyr, B, H, Lp, D)
        moved = torch.gather(cache, 3, src_i)  # read all before writing any
        old = torch.gather(cache, 3, dst_i)
        cache.scatter_(3, dst_i, torch.where(valid.view(1, B, 1, Lp, 1), moved, old))


# ---------------------------------------------------------------------------------------------------------------
# The fused decoder-layer ops (``hydra_fast.fastpath``). Each follows HF Llama/Qwen's rounding order exactly, so
# the fused layer matches the HF modules bit for bit in fp32 and as HF rounds in bf16/fp16:
# - the residual sum is rounded to the dtype before it is normalised;
# - RMSNorm: the row's mean square in fp32, x * rsqrt(ms + eps) rounded to the dtype, then times the weight;
# - RoPE: q * cos and rotate_half(q) * sin each rounded to the dtype, then their sum (cos/sin in the dtype);
# - SiLU-and-multiply: silu(gate) rounded to the dtype, then times up.
# ---------------------------------------------------------------------------------------------------------------
def rms_norm(
    x: torch.Tensor,  # [..., d]
    weight: torch.Tensor,  # [d]
    eps: float,
) -> torch.Tensor:  # [..., d] in x's dtype
    xf = x.float()
    variance = xf.pow(2).mean(-1, keepdim=True)
    return weight * (xf * torch.rsqrt(variance + eps)).to(x.dtype)


def add_rms_norm(
    x: torch.Tensor,  # [..., d] (a sublayer's output)
    residual: torch.Tensor,  # [..., d] (the residual stream before it)
    weight: torch.Tensor,  # [d]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # (rms_norm(x + residual) [..., d], x + residual [..., d])
    h = x + residual  # rounded to the dtype, as HF's residual add
    return rms_norm(h, weight, eps), h


def silu_mul(
    x: torch.Tensor,  # [..., 2 * I]: gate | up, the output of the fused gate|up projection
) -> torch.Tensor:  # [..., I]
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


_silu_mul = silu_mul  # for add_rms_norm_linear, whose flag (the schema's name) hides the function


# The fused linear ops: the elementwise op before a projection, then the projection (on CUDA one GEMV kernel for
# a few rows; its dot products are summed in another order than a GEMM's, so it matches these to fp32 rounding).
def linear(
    x: torch.Tensor,  # [..., K]
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None,  # [N] or None
) -> torch.Tensor:  # [..., N]
    return F.linear(x, weight, bias)


def rms_norm_linear(x, norm_weight, eps: float, weight, bias) -> torch.Tensor:
    """linear(rms_norm(x [..., K], norm_weight [K], eps), weight [N, K], bias [N] or None) -> [..., N]."""
    return F.linear(rms_norm(x, norm_weight, eps), weight, bias)


def add_rms_norm_linear(x, residual, norm_weight, eps: float, weight, bias,
                        silu_mul: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(linear(rms_norm(x + residual), weight, bias) [..., N], x + residual [..., K]): add_rms_norm, projected.
    ``silu_mul``: weight is gate | up [2I, K] and the first output is silu_mul of the product [..., I]."""
    normed, h = add_rms_norm(x, residual, norm_weight, eps)
    out = F.linear(normed, weight, bias)
    return (_silu_mul(out) if silu_mul else out), h


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_kv_write(
    qkv: torch.Tensor,  # [B, N, (Hq + 2 Hkv) * D]: q | k | v, the output of the fused q|k|v projection
    cos: torch.Tensor,  # [B, N, D] in qkv's dtype (the model's rotary embedding at each token's position)
    sin: torch.Tensor,  # [B, N, D]
    k_cache: torch.Tensor,  # [L, B, Hkv, S, D], modified in place
    v_cache: torch.Tensor,  # [L, B, Hkv, S, D], modified in place
    layer: int,
    cache_lens: torch.Tensor,  # int32 [B]: token n of sequence b goes to slot cache_lens[b] + n
    num_q_heads: int,
    num_kv_heads: int,
    q_norm: torch.Tensor | None,  # [D] per-head RMSNorm of q before RoPE (Qwen3), or None
    k_norm: torch.Tensor | None,  # [D] likewise for k
    eps: float,
) -> torch.Tensor:  # q after (norm and) RoPE, [B, N, Hq, D]
    """Split q|k|v, normalise q and k per head (when given), rotate them, and write k and v into one layer of
    the cache at slots [len, len + N). Slots at or past S are the caller's error (generate checks capacity);
    the reference clamps them to S - 1 like ``TreeKVCache.update``."""
    B, N, _ = qkv.shape
    Hq, Hkv = num_q_heads, num_kv_heads
    D = cos.shape[-1]
    q, k, v = qkv.view(B, N, Hq + 2 * Hkv, D).split([Hq, Hkv, Hkv], dim=2)  # [B, N, H, D] each
    if q_norm is not None:
        q = rms_norm(q, q_norm, eps)
    if k_norm is not None:
        k = rms_norm(k, k_norm, eps)
    c, s = cos.unsqueeze(2), sin.unsqueeze(2)  # [B, N, 1, D]
    q = q * c + _rotate_half(q) * s
    k = k * c + _rotate_half(k) * s
    S = k_cache.shape[3]
    slots = cache_lens.to(torch.long).view(B, 1) + torch.arange(N, device=qkv.device).view(1, N)  # [B, N]
    index = slots.clamp(max=S - 1).view(B, 1, N, 1).expand(B, Hkv, N, D)  # [B, Hkv, N, D]
    k_cache[layer].scatter_(2, index, k.transpose(1, 2).to(k_cache.dtype))
    v_cache[layer].scatter_(2, index, v.transpose(1, 2).to(v_cache.dtype))
    return q.contiguous()


# ---------------------------------------------------------------------------------------------------------------
# Lossless sampling on the tree (``accept_sample``).
# ---------------------------------------------------------------------------------------------------------------
def _reject_point_mass(residual, token, p_token, rejected, node):
    """The residual [B, V] after rejecting ``token`` [B] under the point-mass rule: its entry set to 0 where
    ``rejected`` [B]. p_token [B] is the token's residual entry; node [B] the node being expanded (unused)."""
    kept = torch.where(rejected, torch.zeros_like(p_token), p_token)
    return residual.scatter(1, token.view(-1, 1), kept.view(-1, 1))


def _accept_point_mass(residual, token, p_token, u, node):
    """Accept with probability r(token) / sum(r): u * sum(r) < r(token)."""
    return u * residual.sum(-1) < p_token


def _walk_tree(probs, candidates, first_child, next_sibling, uniform, max_depth, test, reject):
    """Multi-round rejection down the tree, one child test per iteration (a static trip count of N - 1).

    ``test(residual, token, p_token, u, node)`` -> bool [B] decides a child's test and ``reject(residual, token,
    p_token, rejected, node)`` -> residual updates after a rejection; node [B] is the node being expanded.
    first_child / next_sibling: [N] (one tree for the batch) or [B, N] (one per sequence).
    Returns (accept_len [B], out_tokens [B, L], accepted_nodes [B, L])."""
    B, N, V = probs.shape
    L = max_depth + 1
    dev = probs.device
    rows = torch.arange(B, device=dev)
    first_child, next_sibling = first_child.expand(B, N), next_sibling.expand(B, N)  # [B, N]
    p = probs.double()  # [B, N, V]
    residual = p[:, 0].clone()  # [B, V] the expanded node's residual, unnormalised
    node = torch.zeros(B, dtype=torch.long, device=dev)  # [B] the node being expanded
    child = first_child[:, 0].clone()  # [B] the child under test, -1 when none is left
    accept_len = torch.zeros(B, dtype=torch.long, device=dev)
    nodes = torch.full((B, L), -1, dtype=torch.long, device=dev)
    nodes[:, 0] = 0
    for _ in range(N - 1):  # each non-root node is tested at most once
        active = child >= 0
        c = child.clamp(0, N - 1)
        token = candidates[rows, c].clamp(0, V - 1)  # [B]
        p_token = residual.gather(1, token.view(B, 1)).view(B)
        accepted = active & test(residual, token, p_token, uniform[rows, c].double(), node)
        rejected = active & ~accepted
        residual = reject(residual, token, p_token, rejected, node)
        accept_len = accept_len + accepted.long()
        slot = accept_len.clamp(max=L - 1).view(B, 1)
        nodes = nodes.scatter(1, slot, torch.where(accepted, c, nodes.gather(1, slot).view(B)).view(B, 1))
        residual = torch.where(accepted.view(B, 1), p[rows, c], residual)
        node = torch.where(accepted, c, node)
        child = torch.where(accepted, first_child[rows, c], torch.where(rejected, next_sibling[rows, c], child))
    # The bonus token: inverse CDF of the residual, the first v whose CDF exceeds u * total.
    cdf = residual.cumsum(-1)  # [B, V]
    target = uniform[:, 0].double().view(B, 1) * cdf[:, -1:]
    extra = (cdf <= target).sum(-1).clamp(max=V - 1)
    accept_len = accept_len.clamp(max=L - 1)
    j = torch.arange(L, device=dev).view(1, L)
    drafted = candidates.gather(1, nodes.roll(-1, dims=1).clamp(0, N - 1))  # [B, L] the next node's token
    out = torch.where(j < accept_len.view(B, 1), drafted, torch.full_like(drafted, -1))
    out = torch.where(j == accept_len.view(B, 1), extra.view(B, 1).expand(B, L), out)
    return accept_len, out, nodes


def accept_sample(
    probs: torch.Tensor,  # float32 [B, N, V]: the target distribution after each node (p / sum p is used)
    candidates: torch.Tensor,  # int64 [B, N]
    first_child: torch.Tensor,  # int64 [N] or [B, N] (per sequence): a node's first child to try, -1 for a leaf
    next_sibling: torch.Tensor,  # int64 [N] or [B, N]: the child tried after this one, -1 for the last
    uniform: torch.Tensor,  # float32 [B, N] in [0, 1): [b, n] decides node n's test, [b, 0] draws the bonus token
    max_depth: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lossless speculative sampling on a tree of deterministic drafts (point-mass multi-round rejection).

    At an accepted node with target distribution p, its children c1, c2, ... are tried in order against the
    residual r (r = p at first): c_i is accepted with probability r(c_i) / sum(r); on rejection r(c_i) = 0. When
    every child is rejected (or the node is a leaf) the bonus token is drawn from r / sum(r).

    Why it is exact: the children are a deterministic function of the context (the heads' top-k in rank order),
    i.e. each is a point mass q_i = delta(c_i). After rejecting c_1..c_{i-1} (distinct tokens D_{i-1}),
    r = p / (1 - p(D_{i-1})) off D_{i-1}, and the chance of having come this far is the telescoping product
    prod_j (1 - r_j(c_j)) = 1 - p(D_{i-1}). So c_i is emitted with probability p(c_i) if it is new (0 if it
    repeats a rejected sibling), and a token x outside the children with (1 - p(D)) * p(x) / (1 - p(D)) = p(x):
    the emitted token has law p exactly. An accepted child repeats the argument one level down with the child's
    own target row, so the emitted tokens follow the target's autoregressive law. This is SpecInfer's/EAGLE's
    multi-round rule with q = delta(c_i): min(1, r(c)/q(c)) = r(c) and norm(relu(r - q)) zeroes c.

    As accept_greedy: (accept_len [B], out_tokens [B, L], accepted_nodes [B, L]), L = max_depth + 1.
    """
    return _walk_tree(probs, candidates, first_child, next_sibling, uniform, max_depth,
                      test=_accept_point_mass, reject=_reject_point_mass)


def accept_sample_iid(
    probs: torch.Tensor,  # float32 [B, N, V] target distributions
    draft_probs: torch.Tensor,  # float32 [B, N, V]: q at each node, the law its children were drawn from
    candidates: torch.Tensor,  # int64 [B, N]
    first_child: torch.Tensor,  # int64 [N] or [B, N]
    next_sibling: torch.Tensor,  # int64 [N] or [B, N]
    uniform: torch.Tensor,  # float32 [B, N]
    max_depth: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The multi-round rule for children drawn i.i.d. (with replacement) from q (SpecInfer, EAGLE): accept c with
    probability min(1, r(c) / q(c)) (r normalised), else r = relu(r - q); the bonus token from r / sum(r).
    Exact only when the children really are i.i.d. draws from q; hydra_fast's heads pick their top-k
    deterministically and use ``accept_sample``. Reference only (no kernel)."""
    B = probs.shape[0]
    rows = torch.arange(B, device=probs.device)
    q = draft_probs.double()
    q = q / q.sum(-1, keepdim=True)  # [B, N, V]

    def test(residual, token, p_token, u, node):
        q_token = q[rows, node].gather(1, token.view(B, 1)).view(B)
        return u * residual.sum(-1) * q_token < p_token  # u < (r(c) / sum r) / q(c), without a division

    def reject(residual, token, p_token, rejected, node):
        left = (residual / residual.sum(-1, keepdim=True) - q[rows, node]).clamp(min=0)  # [B, V]
        return torch.where(rejected.view(B, 1), left, residual)

    return _walk_tree(probs, candidates, first_child, next_sibling, uniform, max_depth, test=test, reject=reject)


# ---------------------------------------------------------------------------------------------------------------
# The dynamic draft tree's layout (``dynamic_tree_layout``, ``hydra_fast.dynamic_tree``).
# ---------------------------------------------------------------------------------------------------------------
def dynamic_tree_layout(
    score: torch.Tensor,  # float32 [B, C]: cumulative draft log-probability, strictly falling along every path
    parent: torch.Tensor,  # int64 [B, C]: candidate index of each candidate's parent, -1 for the root's children
    candidate_depth: torch.Tensor,  # int64 [C]: each candidate's depth (1 for the root's children)
    nodes: int,  # 1 <= nodes <= C: candidates kept
    context_len: int,  # >= 0: nodes of the context chain off the root
    max_depth: int,  # >= max(deepest kept candidate, context_len)
) -> tuple[torch.Tensor, ...]:
    """Keep the ``nodes`` best candidates, by score then by lower candidate index (a stable descending sort: ties
    between unrelated candidates are defined), and lay them out as a tree: the root (node 0), the kept
    candidates in candidate order (parents before children, a level's nodes together), then a chain of
    ``context_len`` nodes off the root. A parent index outside [0, C) or a parent that was not kept reads as
    the root (a broken contract gives a wrong tree, never an error or a read out of bounds).

    -> (kept int64 [B, nodes] (candidate index of nodes 1 .. nodes), paths int64 [B, N, L] (root .. node, -1
    padded, L = max_depth + 1), tree_mask bool [B, N, N], depth int64 [B, N], first_child int64 [B, N],
    next_sibling int64 [B, N]), N = 1 + nodes + context_len."""
    B, C = score.shape
    Nh, M, L = 1 + nodes, context_len, max_depth + 1
    N = Nh + M
    dev = score.device
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices  # [B, C] best first
    kept = order[:, :nodes].sort(dim=-1).values  # [B, nodes]
    slot = torch.zeros(B, C + 1, dtype=torch.long, device=dev)  # candidate (C: the root) -> node index
    slot.scatter_(1, kept, torch.arange(1, Nh, device=dev).view(1, nodes).expand(B, nodes))
    up = parent.gather(1, kept)  # [B, nodes]
    chain = torch.arange(Nh - 1, N - 1, device=dev).view(1, M).expand(B, M).clone()  # the context chain's parents
    chain[:, :1] = 0
    par = torch.cat([torch.full((B, 1), -1, dtype=torch.long, device=dev),
                     slot.gather(1, torch.where((up < 0) | (up >= C), C, up)), chain], dim=1)  # [B, N]
    depth = torch.cat([torch.zeros(B, 1, dtype=torch.long, device=dev), candidate_depth[kept],
                       torch.arange(1, M + 1, device=dev).view(1, M).expand(B, M)], dim=1)  # [B, N]
    # ancestors by pointer walking: walk[k] = the k-th ancestor of each node, -1 past the root
    walk = [torch.arange(N, device=dev).view(1, N).expand(B, N)]
    par_ext = torch.cat([par, torch.full((B, 1), -1, dtype=torch.long, device=dev)], dim=1)  # [B, N + 1]
    for _ in range(L - 1):
        walk.append(par_ext.gather(1, torch.where(walk[-1] < 0, N, walk[-1])))
    ancestors = torch.stack(walk, dim=-1)  # [B, N, L]
    col = torch.arange(L, device=dev).view(1, 1, L)
    paths = ancestors.gather(2, (depth.unsqueeze(-1) - col).clamp(0, L - 1))  # column c: the depth-c ancestor
    paths = torch.where(col <= depth.unsqueeze(-1), paths, torch.full_like(paths, -1))
    mask = torch.zeros(B, N, N + 1, dtype=torch.bool, device=dev)
    mask.scatter_(2, torch.where(paths >= 0, paths, N), True)
    first_child, next_sibling = _child_lists(par)
    return kept, paths, mask[:, :, :N].contiguous(), depth, first_child, next_sibling


def _child_lists(parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence parents int64 [B, N] (-1 for the root) -> (first_child [B, N], next_sibling [B, N]): each
    node's children in index order, -1 where there is none (``accept_sample`` tries them in that order)."""
    B, N = parents.shape
    j = torch.arange(N, device=parents.device)
    none = torch.full((), N, dtype=torch.long, device=parents.device)
    is_child = parents.view(B, 1, N) == j.view(1, N, 1)  # [B, p, j]: j is a child of p
    first = torch.where(is_child, j.view(1, 1, N), none).amin(-1)  # [B, N]
    later_sibling = (parents.view(B, 1, N) == parents.view(B, N, 1)) & (j.view(1, 1, N) > j.view(1, N, 1))
    nxt = torch.where(later_sibling, j.view(1, 1, N), none).amin(-1)  # [B, N]
    return torch.where(first == N, -1, first), torch.where(nxt == N, -1, nxt)


def topk_rows(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., V] -> (values [..., k] in x's dtype, indices int64 [..., k]): each row's k largest by value
    descending; ties to the lower index, NaN above every number (a stable descending sort defines the order)."""
    V = x.shape[-1]
    if not 1 <= k <= V:
        raise ValueError(f"topk_rows: k must be in [1, V = {V}] (x's last dim), got {k}")
    values, indices = torch.sort(x, dim=-1, descending=True, stable=True)  # [..., V] each
    return values[..., :k].contiguous(), indices[..., :k].contiguous()

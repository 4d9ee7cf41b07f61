"""Every compiled op against its pure-PyTorch twin in reference.py (the spec).

Per op: hand-built cases with exact expected outputs, then seeded random inputs over dtypes, odd sizes,
strided layouts and GQA ratios, then opcheck, torch.compile(fullgraph=True), CUDA-graph capture (cuda only)
and bad inputs. The same file runs on the CPU machines and, with the cuda parameters, on the H200.
"""
from __future__ import annotations

import math
import zlib

import pytest
import torch

from conftest import (
    DTYPES, TOL, assert_close_by_dtype, assert_names_cpu_argument, assert_within_lowp_error, cuda_ready, generator,
    needs_extension, noncontiguous, randn, random_tree, replay_cuda_graph, require_kernel,
)
from hydra_fast import ops, reference

pytestmark = needs_extension


def seed_of(*parts) -> int:
    """A stable seed per test case (Python's hash() is salted per process)."""
    return zlib.crc32(repr(parts).encode())


def poison_allocator(nbytes: int, device: torch.device) -> None:
    """Leave a freed NaN block of nbytes in the allocator, so an output that reuses it and misses an element
    shows NaN (the CUDA caching allocator reuses it; on the CPU this is best effort)."""
    torch.full((nbytes // 4 + 1,), float("nan"), dtype=torch.float32, device=device)


# ---------------------------------------------------------------------------------------------------------------
# tree_attention


def attention_plain(q, k_cache, v_cache, cache_lens, tree_mask, scale):
    """The reference's math without the upcast: matmuls and softmax in q's dtype (flash-attention's
    attention_ref with upcast=False). Its error vs the fp32 reference sets the kernel's error budget."""
    B, Hq, N, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    rel = torch.arange(S, device=q.device).view(1, 1, S) - cache_lens.long().view(B, 1, 1)  # [B, 1, S]
    tree_ok = tree_mask[:, rel.clamp(0, N - 1).view(B, S)].permute(1, 0, 2)  # [B, N, S]
    allowed = (rel < 0) | ((rel < N) & tree_ok)  # [B, N, S]
    k = k_cache.repeat_interleave(Hq // Hkv, dim=1)  # [B, Hq, S, D]
    v = v_cache.repeat_interleave(Hq // Hkv, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, Hq, N, S]
    probs = scores.masked_fill(~allowed.unsqueeze(1), float("-inf")).softmax(-1)
    return torch.matmul(probs, v).transpose(1, 2)  # [B, N, Hq, D]


def make_attention_inputs(B, Hq, Hkv, N, S, D, lens, dtype, device, seed, strided_kv=True):
    gen = generator(seed)
    q = randn((B, N, Hq, D), dtype, device, gen).transpose(1, 2)  # [B, Hq, N, D], the projection's layout
    pad = 5 if strided_kv else 0
    k_cache = randn((B, Hkv, S + pad, D), dtype, device, gen)[:, :, :S]  # [B, Hkv, S, D]
    v_cache = randn((B, Hkv, S + pad, D), dtype, device, gen)[:, :, :S]
    cache_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    tree_mask = random_tree(N, gen).mask.to(device)
    return q, k_cache, v_cache, cache_lens, tree_mask, 1.0 / math.sqrt(D)


ATTN_CASES = [
    # B, Hq, Hkv, N, S, D, cache_lens
    (1, 1, 1, 1, 1, 64, [0]),  # one query, empty cache
    (2, 4, 4, 7, 83, 64, [0, 76]),  # GQA 1, tree in the last slots
    (2, 6, 2, 64, 400, 128, [300, 17]),  # GQA 3, a context of 300
    (1, 16, 2, 128, 1200, 128, [1000]),  # GQA 8, N = 128, a context of 1000
    (3, 4, 1, 83, 769, 64, [686, 0, 333]),  # GQA 4, odd N and S
    (1, 3, 1, 1, 640, 64, [300]),  # one query, GQA 3 (a plain step of SmolLM2): CUDA merges 5 chunks in a cluster
    (1, 2, 1, 1, 2048, 64, [1500]),  # one query, a long cache: 16 chunks, more than a cluster, the combine kernel
    (1, 3, 1, 72, 640, 64, [300]),  # a 72-node tree, GQA 3: 4 row tiles, so 5 chunks and the combine kernel
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: "B{}-H{}x{}-N{}-S{}-D{}".format(*c[:6]))
def test_tree_attention(device, dtype, case):
    require_kernel("tree_attention", device)
    B, Hq, Hkv, N, S, D, lens = case
    args = make_attention_inputs(B, Hq, Hkv, N, S, D, lens, dtype, device, seed_of("attn", case, dtype))
    q, k_cache, v_cache, cache_lens, tree_mask, scale = args
    # strided views as the engine passes them (size-1 dims make a view contiguous)
    assert (N == 1 or Hq == 1 or not q.is_contiguous()) and (B * Hkv == 1 or not k_cache.is_contiguous())
    poison_allocator(B * N * Hq * D * q.element_size(), device)
    out = ops.tree_attention(*args)
    assert out.shape == (B, N, Hq, D) and out.dtype == dtype and out.device == q.device
    assert torch.isfinite(out).all()
    ref32 = reference.tree_attention(q.float(), k_cache.float(), v_cache.float(), cache_lens, tree_mask, scale)
    ref_low = attention_plain(*args)
    assert_within_lowp_error(out, ref32, ref_low, dtype)
    if dtype == torch.float32:
        assert_close_by_dtype(out, ref32)


@pytest.mark.parametrize("D", [64, 128])
def test_tree_attention_sees_exactly_the_mask(device, D):
    require_kernel("tree_attention", device)
    # V is one-hot per position, so the output of each query is the softmax weight of each position: zero
    # exactly outside the cache and the query's ancestors, and the reference's weights inside.
    B, H, N, S, length = 1, 2, 5, 12, 4
    gen = generator(seed_of("mask", D))
    q = randn((B, H, N, D), torch.float32, device, gen)
    k_cache = randn((B, H, S, D), torch.float32, device, gen)
    v_cache = torch.zeros(B, H, S, D, device=device)
    v_cache[:, :, torch.arange(S), torch.arange(S)] = 1.0
    tree_mask = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 1, 0, 1, 0], [1, 1, 0, 0, 1]],
                             dtype=torch.bool, device=device)
    cache_lens = torch.tensor([length], dtype=torch.int32, device=device)
    out = ops.tree_attention(q, k_cache, v_cache, cache_lens, tree_mask, 0.125)  # [B, N, H, D]
    weights = out[0, :, :, :S]  # [N, H, S]
    visible = torch.zeros(N, S, dtype=torch.bool, device=device)
    visible[:, :length] = True
    visible[:, length:length + N] = tree_mask
    assert (weights[~visible.unsqueeze(1).expand(N, H, S)] == 0).all()
    assert (weights[visible.unsqueeze(1).expand(N, H, S)] > 0).all()
    assert_close_by_dtype(out, reference.tree_attention(q, k_cache, v_cache, cache_lens, tree_mask, 0.125))


# ---------------------------------------------------------------------------------------------------------------
# draft_head_mlp


def make_mlp_inputs(R, d, k, V, blocks, residual, dtype, device, seed):
    gen = generator(seed)
    hidden = randn((R, d), dtype, device, gen)
    if R > 1:
        hidden = noncontiguous(hidden, dim=0)
    path_tokens = torch.randint(0, V, (R, k), generator=gen).to(device)
    embed = randn((V, d), dtype, device, gen)
    fan_in = (k + 1) * d
    weights = [randn((d, fan_in if i == 0 else d), dtype, device, gen, 1 / math.sqrt(fan_in if i == 0 else d))
               for i in range(blocks)]
    biases = [randn((d,), dtype, device, gen, 0.1) for _ in range(blocks)]
    res_weight = randn((d, fan_in), dtype, device, gen, 1 / math.sqrt(fan_in)) if residual != "none" else None
    res_bias = randn((d,), dtype, device, gen, 0.1) if residual == "weight+bias" else None
    return hidden, path_tokens, embed, weights, biases, res_weight, res_bias


MLP_CASES = [
    # R, d, k, V, blocks, residual
    (1, 7, 0, 11, 1, "none"),
    (7, 83, 1, 769, 2, "weight+bias"),
    (83, 64, 3, 100, 3, "weight"),  # residual without a bias
    (64, 128, 0, 50, 2, "weight+bias"),  # k = 0 with the optional [d, d] residual
    (5, 769, 2, 83, 1, "weight+bias"),
]


def _to(args, dtype):
    return [a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else
            [x.to(dtype) for x in a] if isinstance(a, list) else a for a in args]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", MLP_CASES, ids=lambda c: "R{}-d{}-k{}-V{}-blocks{}-{}".format(*c))
def test_draft_head_mlp(device, dtype, case):
    require_kernel("draft_head_mlp", device)
    R, d, k, V, blocks, residual = case
    args = make_mlp_inputs(*case, dtype, device, seed_of("mlp", case, dtype))
    poison_allocator(R * d * args[0].element_size(), device)
    out = ops.draft_head_mlp(*args)
    assert out.shape == (R, d) and out.dtype == dtype
    assert torch.isfinite(out).all()
    ref32 = reference.draft_head_mlp(*_to(args, torch.float32))
    ref_low = reference.draft_head_mlp(*args)
    assert_within_lowp_error(out, ref32, ref_low, dtype)


def test_draft_head_mlp_gathers_embeddings(device):
    require_kernel("draft_head_mlp", device)
    # One identity block with zero bias and the residual [I | 0 | I]: out = hidden + embed[tok1] + silu(same).
    d, V = 8, 5
    gen = generator(seed_of("gather"))
    hidden = randn((2, d), torch.float32, device, gen)
    embed = randn((V, d), torch.float32, device, gen)
    tokens = torch.tensor([[3, 1], [0, 4]], device=device)
    eye, zero = torch.eye(d, device=device), torch.zeros(d, d, device=device)
    w = torch.cat([eye, zero, eye], dim=1)  # [d, 3d]
    out = ops.draft_head_mlp(hidden, tokens, embed, [w], [torch.zeros(d, device=device)], w, None)
    x = hidden + embed[tokens[:, 1]]
    torch.testing.assert_close(out, x + torch.nn.functional.silu(x))


# ---------------------------------------------------------------------------------------------------------------
# accept_greedy / accept_typical

# The 5-node tree of the hand-built cases: root 0 -> 1 -> {3, 4}, root 0 -> 2.
HAND_PARENTS = [-1, 0, 0, 1, 1]


def one_hot_logits(argmax_rows, V, dtype, device, ties=()):
    """[B, N, V] logits, random small values plus 10 at each row's argmax; (b, n, v) in ties gets 10 too."""
    gen = generator(seed_of("hand", V))
    B, N = len(argmax_rows), len(argmax_rows[0])
    logits = torch.rand(B, N, V, generator=gen)
    for b, row in enumerate(argmax_rows):
        for n, v in enumerate(row):
            logits[b, n, v] = 10.0
    for b, n, v in ties:
        logits[b, n, v] = 10.0
    return logits.to(dtype=dtype, device=device)


@pytest.mark.parametrize("dtype", DTYPES)
def test_accept_greedy_hand_built(device, dtype):
    require_kernel("accept_greedy", device)
    V = 10
    paths = torch.tensor([[0, 1, 4], [0, 1, 3], [0, 2, -1]], device=device)
    # per sequence: argmax of each node's logits, and the drafted token of each node
    argmax = [
        [5, 7, 2, 3, 4],  # node 1 (5) and node 3 (7) match: path 1 = [0, 1, 3], a = 2, extra argmax[3] = 3
        [5, 7, 2, 3, 4],  # nodes 1, 3 and 4 match: paths 0 and 1 tie at a = 2, the first (node 4) wins
        [1, 7, 2, 3, 4],  # nothing matches: a = 0, the extra token is the root's argmax 1
        [6, 7, 2, 3, 4],  # only node 2 (6) matches: path 2, a = 1, extra argmax[2] = 2
    ]
    candidates = torch.tensor([[9, 5, 6, 7, 8], [9, 5, 6, 7, 7], [9, 5, 6, 7, 8], [9, 5, 6, 7, 8]], device=device)
    # sequence 3's root row has a second maximum at 8: argmax takes the first, 6
    logits = one_hot_logits(argmax, V, dtype, device, ties=[(3, 0, 8)])
    accept_len, out_tokens, accepted_nodes = ops.accept_greedy(logits, candidates, paths)
    assert accept_len.tolist() == [2, 2, 0, 1]
    assert out_tokens.tolist() == [[5, 7, 3], [5, 7, 4], [1, -1, -1], [6, 2, -1]]
    assert accepted_nodes.tolist() == [[0, 1, 3], [0, 1, 4], [0, -1, -1], [0, 2, -1]]
    for got, want in zip((accept_len, out_tokens, accepted_nodes), reference.accept_greedy(logits, candidates, paths)):
        assert torch.equal(got, want)


def logits_from_probs(rows, temperature, dtype, device):
    """[B, N, V] logits whose softmax(logits / T) is each given probability row (0 -> -inf)."""
    p = torch.tensor(rows, dtype=torch.float64)
    return (temperature * p.log()).to(dtype=dtype, device=device)


@pytest.mark.parametrize("dtype", DTYPES)
def test_accept_typical_hand_built(device, dtype):
    require_kernel("accept_typical", device)
    T = 0.7
    paths = torch.tensor([[0, 1, 3], [0, 1, 4], [0, 2, -1]], device=device)
    flat = [1 / 8] * 8
    cdf_row = [0.1, 0.2, 0.3, 0.4, 0, 0, 0, 0]  # inverse CDF: u < .1 -> 0, < .3 -> 1, < .6 -> 2, else 3
    # The root row has zeros (0 * log 0 = 0 in the entropy): H = .898, threshold min(.09, .3 e^-H = .122) = .09;
    # node 1 (token 5, p .6) and node 2 (token 6, p .3) pass it.
    root = [0, 0, 0, 0, 0.1, 0.6, 0.3, 0]
    two_good = [0.02, 0.02, 0.4, 0.015, 0.015, 0.015, 0.015, 0.5]  # threshold .09: tokens 2 (.4) and 7 (.5) pass
    peaked = [0.02] * 7 + [0.86]  # threshold .09: only token 7 passes
    probs = [
        # under node 1, node 3 (token 2, p .4) and node 4 (token 7, p .5) both pass: paths 0 and 1 tie at a = 2
        # and node 4's higher log-prob wins (path 1); extra from node 4's row, u = .65 -> 3
        [root, two_good, flat, flat, cdf_row],
        # nodes 3 and 4 (tokens 2 and 3, p .02) fail: paths 0 and 1 tie at a = 1 with equal scores, path 2 (node
        # 2, p .3) has a = 1 and a lower score: path 0 wins; extra from node 1's row, u = .45 -> 7
        [root, peaked, flat, cdf_row, flat],
        # a peaked root (H = .293, threshold .09) rejects tokens 5 and 6 (p .02): a = 0; extra u = .05 -> 4
        [[0, 0, 0, 0, 0.94, 0.02, 0.02, 0.02], flat, flat, flat, flat],
    ]
    candidates = torch.tensor([[4, 5, 6, 2, 7], [4, 5, 6, 2, 3], [4, 5, 6, 2, 7]], device=device)
    logits = logits_from_probs(probs, T, dtype, device)
    uniform = torch.tensor([0.65, 0.45, 0.05], device=device)
    accept_len, out_tokens, accepted_nodes = ops.accept_typical(logits, candidates, paths, uniform, T, 0.09, 0.3)
    assert accept_len.tolist() == [2, 1, 0]
    assert out_tokens.tolist() == [[5, 7, 3], [5, 7, -1], [4, -1, -1]]
    assert accepted_nodes.tolist() == [[0, 1, 4], [0, 1, -1], [0, -1, -1]]
    want = reference.accept_typical(logits, candidates, paths, uniform, T, 0.09, 0.3)
    for got, w in zip((accept_len, out_tokens, accepted_nodes), want):
        assert torch.equal(got, w)


def check_accept_properties(tree, candidates, accept_len, out_tokens, accepted_nodes, V):
    """Accepted nodes form a root-to-node path; out_tokens are their drafted tokens, then one extra token."""
    B, L = out_tokens.shape
    for b in range(B):
        a = int(accept_len[b])
        nodes, toks = accepted_nodes[b].tolist(), out_tokens[b].tolist()
        assert 0 <= a < L and nodes[0] == 0
        assert nodes[a + 1:] == [-1] * (L - a - 1) and toks[a + 1:] == [-1] * (L - a - 1)
        for j in range(1, a + 1):
            assert tree.parents[nodes[j]] == nodes[j - 1]
            assert toks[j - 1] == int(candidates[b, nodes[j]])
        assert 0 <= toks[a] < V


ACCEPT_CASES = [
    # B, N, V
    (1, 1, 7),
    (2, 7, 83),
    (3, 64, 769),
    (1, 128, 4096 + 32),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ACCEPT_CASES, ids=lambda c: "B{}-N{}-V{}".format(*c))
def test_accept_greedy(device, dtype, case):
    require_kernel("accept_greedy", device)
    B, N, V = case
    gen = generator(seed_of("greedy", case, dtype))
    tree = random_tree(N, gen)
    paths = tree.paths.to(device)
    logits = randn((B, N, V), dtype, device, gen)
    if B > 1:
        logits = noncontiguous(logits, dim=0)
    parent_argmax = logits.float().argmax(-1).cpu()[:, torch.tensor(tree.parents).clamp(min=0)]  # [B, N]
    drafted_right = torch.rand(B, N, generator=gen) < 0.8
    candidates = torch.where(drafted_right, parent_argmax, torch.randint(0, V, (B, N), generator=gen)).to(device)
    accept_len, out_tokens, accepted_nodes = ops.accept_greedy(logits, candidates, paths)
    want = reference.accept_greedy(logits, candidates, paths)
    for got, w in zip((accept_len, out_tokens, accepted_nodes), want):
        assert got.dtype == torch.long and torch.equal(got, w)
    check_accept_properties(tree, candidates, accept_len, out_tokens, accepted_nodes, V)
    # greedy: every emitted token is the base model's argmax at the node before it
    argmax = logits.float().argmax(-1)
    for b in range(B):
        for j in range(int(accept_len[b]) + 1):
            assert int(out_tokens[b, j]) == int(argmax[b, accepted_nodes[b, j]])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ACCEPT_CASES, ids=lambda c: "B{}-N{}-V{}".format(*c))
def test_accept_typical(device, dtype, case):
    require_kernel("accept_typical", device)
    B, N, V = case
    T, eps, alpha = 0.7, 0.09, 0.3
    gen = generator(seed_of("typical", case, dtype))
    tree = random_tree(N, gen)
    paths = tree.paths.to(device)
    logits = randn((B, N, V), dtype, device, gen, scale=4.0)
    probs = torch.softmax(logits.double().cpu() / T, -1)  # [B, N, V]
    parent_rows = probs[:, torch.tensor(tree.parents).clamp(min=0)]  # [B, N, V]
    sampled = torch.multinomial(parent_rows.reshape(B * N, V), 1, generator=gen).view(B, N)
    candidates = torch.where(torch.rand(B, N, generator=gen) < 0.8, sampled,
                             torch.randint(0, V, (B, N), generator=gen)).to(device)
    uniform = torch.rand(B, generator=gen).to(device)
    accept_len, out_tokens, accepted_nodes = ops.accept_typical(logits, candidates, paths, uniform, T, eps, alpha)
    want = reference.accept_typical(logits, candidates, paths, uniform, T, eps, alpha)
    for got, w in zip((accept_len, out_tokens, accepted_nodes), want):
        assert got.dtype == torch.long and torch.equal(got, w)
    check_accept_properties(tree, candidates, accept_len, out_tokens, accepted_nodes, V)


# ---------------------------------------------------------------------------------------------------------------
# kv_compact


def test_kv_compact_hand_built(device):
    require_kernel("kv_compact", device)
    S = 8
    k_cache = (100 + torch.arange(S, dtype=torch.float32, device=device)).view(1, 1, 1, S, 1).repeat(2, 2, 1, 1, 1)
    k_cache[:, 1] += 100  # sequence 1: 200 + slot
    v_cache = -k_cache
    cache_lens = torch.tensor([2, 1], dtype=torch.int32, device=device)
    # sequence 0: slots 2 + [0, 2, 5] -> 2, 3, 4;  sequence 1: only the root, nothing moves
    accepted_nodes = torch.tensor([[0, 2, 5], [0, -1, -1]], device=device)
    ops.kv_compact(k_cache, v_cache, cache_lens, accepted_nodes)
    for layer in range(2):
        assert k_cache[layer, 0].flatten().tolist() == [100, 101, 102, 104, 107, 105, 106, 107]
        assert k_cache[layer, 1].flatten().tolist() == [200 + s for s in range(S)]
    assert torch.equal(v_cache, -k_cache)


def random_accepted_nodes(B, Lp, num_nodes, gen):
    """[B, Lp]: root-to-node paths of a random tree (a node's index >= its depth), -1 padded."""
    tree = random_tree(num_nodes, gen, max_depth=Lp - 1)
    rows = []
    for _ in range(B):
        node = int(torch.randint(0, num_nodes, (1,), generator=gen))
        path = []
        while node >= 0:
            path.append(node)
            node = tree.parents[node]
        rows.append(path[::-1] + [-1] * (Lp - len(path)))
    return torch.tensor(rows, dtype=torch.long)


KV_CASES = [
    # layers, B, Hkv, S, D, Lp, tree nodes
    (2, 1, 1, 7, 64, 1, 1),  # only the root: nothing moves
    (2, 3, 3, 83, 64, 5, 20),
    (3, 2, 4, 300, 128, 8, 64),
]


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", KV_CASES, ids=lambda c: "L{}-B{}-H{}-S{}-D{}-Lp{}".format(*c))
def test_kv_compact(device, dtype, case, strided):
    require_kernel("kv_compact", device)
    layers, B, H, S, D, Lp, num_nodes = case
    gen = generator(seed_of("kv", case, dtype, strided))
    pad = 3 if strided else 0
    k_buf = randn((layers, B, H, S + pad, D), dtype, device, gen)  # poison: fresh values everywhere
    v_buf = randn((layers, B, H, S + pad, D), dtype, device, gen)
    k_cache, v_cache = k_buf[:, :, :, :S], v_buf[:, :, :, :S]
    assert k_cache.is_contiguous() == (not strided)
    accepted_nodes = random_accepted_nodes(B, Lp, num_nodes, gen).to(device)
    lens = torch.randint(0, S - num_nodes + 1, (B,), generator=gen).to(torch.int32).to(device)
    k_before, v_before, k_want, v_want = k_buf.clone(), v_buf.clone(), k_cache.clone(), v_cache.clone()
    reference.kv_compact(k_want, v_want, lens, accepted_nodes)
    ops.kv_compact(k_cache, v_cache, lens, accepted_nodes)
    assert torch.equal(k_cache, k_want) and torch.equal(v_cache, v_want)
    # every slot outside [len, len + accepted count) is untouched, the padding beyond S too
    moved = torch.zeros(B, S + pad, dtype=torch.bool)
    for b in range(B):
        n = int((accepted_nodes[b] >= 0).sum())
        moved[b, int(lens[b]):int(lens[b]) + n] = True
    keep = (~moved).to(device).view(1, B, 1, S + pad, 1).expand_as(k_buf)
    assert torch.equal(k_buf[keep], k_before[keep]) and torch.equal(v_buf[keep], v_before[keep])


# ---------------------------------------------------------------------------------------------------------------
# CPU guards: values that break the caller's contract (the checks cannot see data) never index out of bounds;
# where the reference is defined for them, the kernels agree with it.


def test_cpu_out_of_range_values_match_reference():
    gen = generator(seed_of("guards"))
    B, H, N, S, D = 4, 2, 5, 12, 64
    q, k_cache, v_cache, _, tree_mask, scale = make_attention_inputs(B, H, H, N, S, D, [0] * B, torch.float32,
                                                                      "cpu", seed_of("guards-attn"))
    cache_lens = torch.tensor([-3, S - 2, S, S + 5], dtype=torch.int32)  # tree partly or wholly outside [0, S)
    torch.testing.assert_close(ops.tree_attention(q, k_cache, v_cache, cache_lens, tree_mask, scale),
                               reference.tree_attention(q, k_cache, v_cache, cache_lens, tree_mask, scale),
                               equal_nan=True)  # a query that sees nothing: NaN in both

    logits, candidates, paths, uniform, T, eps, alpha = small_inputs("accept_typical", "cpu")
    candidates[:, ::2] = -1  # Python indexing in the reference counts negative tokens from the end
    for got, want in zip(ops.accept_typical(logits, candidates, paths, uniform, T, eps, alpha),
                         reference.accept_typical(logits, candidates, paths, uniform, T, eps, alpha)):
        assert torch.equal(got, want)

    k_cache = randn((2, 1, 2, S, 8), torch.float32, "cpu", gen)
    v_cache = randn((2, 1, 2, S, 8), torch.float32, "cpu", gen)
    k_want, v_want = k_cache.clone(), v_cache.clone()
    cache_lens = torch.tensor([S - 3], dtype=torch.int32)
    accepted_nodes = torch.tensor([[0, 1, 50]])  # slot S - 3 + 50 is clamped to S - 1, as in the reference
    reference.kv_compact(k_want, v_want, cache_lens, accepted_nodes)
    ops.kv_compact(k_cache, v_cache, cache_lens, accepted_nodes)
    assert torch.equal(k_cache, k_want) and torch.equal(v_cache, v_want)


# ---------------------------------------------------------------------------------------------------------------
# opcheck, torch.compile, CUDA graphs: small inputs of every op


def small_inputs(op: str, device, seed: int = 0):
    """Small valid arguments of each op (fresh random values, fixed seed)."""
    gen = generator(seed_of("small", op, seed))
    if op == "tree_attention":
        return make_attention_inputs(2, 4, 2, 5, 16, 64, [3, 9], torch.float32, device, seed_of(op, seed))
    if op == "draft_head_mlp":
        return make_mlp_inputs(6, 16, 2, 30, 2, "weight+bias", torch.float32, device, seed_of(op, seed))
    tree = random_tree(7, generator(seed_of("small-tree", op)), max_depth=3)  # one shape for every seed
    B, N, V = 2, 7, 19
    logits = randn((B, N, V), torch.float32, device, gen)
    parent_argmax = logits.argmax(-1)[:, torch.tensor(tree.parents, device=device).clamp(min=0)]
    candidates = torch.where(torch.rand(B, N, generator=gen).to(device) < 0.7, parent_argmax,
                             torch.randint(0, V, (B, N), generator=gen).to(device))
    if op == "accept_greedy":
        return logits, candidates, tree.paths.to(device)
    if op == "accept_typical":
        return logits, candidates, tree.paths.to(device), torch.rand(B, generator=gen).to(device), 0.8, 0.09, 0.3
    assert op == "kv_compact"
    k_cache = randn((2, B, 2, 16, 8), torch.float32, device, gen)
    v_cache = randn((2, B, 2, 16, 8), torch.float32, device, gen)
    lens = torch.tensor([2, 7], dtype=torch.int32, device=device)
    return k_cache, v_cache, lens, random_accepted_nodes(B, 4, 7, gen).to(device)


OPS = ["tree_attention", "draft_head_mlp", "accept_greedy", "accept_typical", "kv_compact"]


@pytest.mark.parametrize("op", OPS)
def test_opcheck(device, op):
    require_kernel(op, device)
    torch.library.opcheck(getattr(torch.ops.hydra_fast, op).default, small_inputs(op, device))


def _clone(args):
    return [a.clone() if isinstance(a, torch.Tensor) else [x.clone() for x in a] if isinstance(a, list) else a
            for a in args]


def _assert_same(got, want):
    if got is None:
        return
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        if g.is_floating_point():
            torch.testing.assert_close(g, w, atol=TOL[g.dtype].atol, rtol=TOL[g.dtype].rtol)
        else:
            assert torch.equal(g, w)


def _step(impl):
    def step(attn, mlp, greedy, typical, kv):
        out = impl.tree_attention(*attn)
        h = impl.draft_head_mlp(*mlp)
        g = impl.accept_greedy(*greedy)
        t = impl.accept_typical(*typical)
        impl.kv_compact(*kv)
        return out, h, g, t
    return step


def _check_compiled(device, impl, backend):
    for op in OPS:
        require_kernel(op, device)
    # fake kernels, schemas and the in-place kv_compact all have to trace without a graph break
    inputs = [small_inputs(op, device) for op in OPS]
    torch._dynamo.reset()
    compiled = torch.compile(_step(impl), fullgraph=True, backend=backend)
    eager_kv = _clone(inputs[4])
    got = compiled(*inputs[:4], inputs[4])
    want = _step(impl)(*inputs[:4], eager_kv)
    for g, w in zip(got, want):
        _assert_same(g, w)
    assert torch.equal(inputs[4][0], eager_kv[0]) and torch.equal(inputs[4][1], eager_kv[1])


def test_compile_fullgraph(device):
    _check_compiled(device, torch.ops.hydra_fast, backend="inductor")


def test_compile_fullgraph_wrappers(device):
    _check_compiled(device, ops, backend="aot_eager")


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_ready(), reason="needs a CUDA device and hydra_fast._C built with CUDA")
@pytest.mark.parametrize("op", OPS)
def test_cuda_graph(op):
    # Capture with one set of inputs, refill the same buffers with new values, replay, compare with eager.
    device = torch.device("cuda")
    require_kernel(op, device)
    static_out, want, static, want_args = replay_cuda_graph(getattr(ops, op), small_inputs(op, device, seed=1),
                                                            small_inputs(op, device, seed=2))
    _assert_same(static_out, want)
    if op == "kv_compact":
        assert torch.equal(static[0], want_args[0]) and torch.equal(static[1], want_args[1])


# ---------------------------------------------------------------------------------------------------------------
# bad inputs: every wrong argument is a RuntimeError that names it


def _replace(args, index, value):
    args = list(args)
    args[index] = value
    return args


def _attn_bad():
    def base():
        return small_inputs("tree_attention", "cpu")  # q [2, 4, 5, 64], caches [2, 2, 16, 64], N = 5
    q, k, v, lens, mask, scale = base()
    return [
        ("k_cache rank", _replace(base(), 1, k[0]), r"k_cache must have 4 dims"),
        ("v_cache shape", _replace(base(), 2, v[:, :, :15]), r"v_cache"),
        ("k_cache dtype", _replace(base(), 1, k.half()), r"k_cache"),
        ("q dtype", [q.double(), k.double(), v.double(), lens, mask, scale], r"q must be bfloat16, float16 or float32"),
        ("cache_lens dtype", _replace(base(), 3, lens.long()), r"cache_lens must be Int"),
        ("cache_lens size", _replace(base(), 3, lens[:1]), r"cache_lens"),
        ("tree_mask dtype", _replace(base(), 4, mask.float()), r"tree_mask must be Bool"),
        ("tree_mask shape", _replace(base(), 4, torch.ones(5, 6, dtype=torch.bool)), r"tree_mask"),
        ("GQA ratio", _replace(base(), 0, q[:, :3]), r"GQA ratio"),
        ("head dim", [torch.randn(2, 4, 5, 320), torch.randn(2, 2, 16, 320), torch.randn(2, 2, 16, 320), lens, mask,
                      scale], r"head dim"),
        ("N > S", [q, k[:, :, :4], v[:, :, :4], lens, mask, scale], r"N \(5\) must be <= cache capacity S"),
        ("B", _replace(base(), 1, k[:1]), r"k_cache"),
        ("q last dim", _replace(base(), 0, q.transpose(2, 3).contiguous().transpose(2, 3)),
         r"q must have a contiguous last dim"),
    ]


def _mlp_bad():
    def base():
        return list(small_inputs("draft_head_mlp", "cpu"))  # hidden [6, 16], k = 2, weights[0] [16, 48]
    hidden, tokens, embed, weights, biases, rw, rb = base()
    return [
        ("missing res_weight", _replace(base(), 5, None), r"res_weight is required"),
        ("res_bias alone", _replace(_replace(base(), 5, None), 6, rb), r"res_weight|res_bias"),
        ("weights/biases lengths", _replace(base(), 4, biases[:1]), r"biases"),
        ("no weights", _replace(_replace(base(), 3, []), 4, []), r"weights must hold at least one"),
        ("weights[0] in-features", _replace(base(), 3, [weights[0][:, :32], weights[1]]), r"weights\[0\]"),
        ("weights[1] shape", _replace(base(), 3, [weights[0], weights[1][:8]]), r"weights\[1\]"),
        ("path_tokens dtype", _replace(base(), 1, tokens.int()), r"path_tokens must be Long"),
        ("path_tokens rows", _replace(base(), 1, tokens[:5]), r"path_tokens"),
        ("embed dtype", _replace(base(), 2, embed.half()), r"embed"),
        ("embed width", _replace(base(), 2, embed[:, :8]), r"embed"),
        ("hidden rank", _replace(base(), 0, hidden[0]), r"hidden must have 2 dims"),
        ("res_weight shape", _replace(base(), 5, rw[:, :16]), r"res_weight"),
        ("biases dtype", _replace(base(), 4, [b.double() for b in biases]), r"biases\[0\]"),
    ]


def _accept_bad(op):
    def base():
        return list(small_inputs(op, "cpu"))  # logits [2, 7, 19], candidates [2, 7]
    logits, cand, paths = base()[:3]
    cases = [
        ("logits rank", _replace(base(), 0, logits[0]), r"logits must have 3 dims"),
        ("logits dtype", _replace(base(), 0, logits.double()), r"logits must be bfloat16"),
        ("candidates dtype", _replace(base(), 1, cand.int()), r"candidates must be Long"),
        ("candidates N", _replace(base(), 1, cand[:, :6]), r"candidates"),
        ("candidates B", _replace(base(), 1, cand[:1]), r"candidates"),
        ("paths rank", _replace(base(), 2, paths[0]), r"paths must have 2 dims"),
        ("paths dtype", _replace(base(), 2, paths.int()), r"paths must be Long"),
        ("logits last dim", _replace(base(), 0, logits.transpose(1, 2).contiguous().transpose(1, 2)),
         r"logits must have a contiguous last dim"),
    ]
    if op == "accept_typical":
        u = base()[3]
        cases += [
            ("uniform dtype", _replace(base(), 3, u.double()), r"uniform must be Float"),
            ("uniform size", _replace(base(), 3, u[:1]), r"uniform"),
            ("temperature", _replace(base(), 4, 0.0), r"temperature must be > 0"),
            ("posterior_threshold", _replace(base(), 5, 0.0), r"posterior_threshold must be > 0"),
            ("posterior_alpha", _replace(base(), 6, -0.3), r"posterior_alpha must be > 0"),
        ]
    return cases


def _kv_bad():
    def base():
        return list(small_inputs("kv_compact", "cpu"))  # caches [2, 2, 2, 16, 8], accepted [2, 4]
    k, v, lens, nodes = base()
    return [
        ("k_cache rank", _replace(base(), 0, k[0]), r"k_cache must have 5 dims"),
        ("v_cache shape", _replace(base(), 1, v[:, :, :1]), r"v_cache"),
        ("v_cache dtype", _replace(base(), 1, v.half()), r"v_cache"),
        ("cache_lens dtype", _replace(base(), 2, lens.long()), r"cache_lens must be Int"),
        ("cache_lens size", _replace(base(), 2, lens[:1]), r"cache_lens"),
        ("accepted_nodes dtype", _replace(base(), 3, nodes.int()), r"accepted_nodes must be Long"),
        ("accepted_nodes rank", _replace(base(), 3, nodes[0]), r"accepted_nodes must have 2 dims"),
        ("Lp > S", _replace(base(), 3, torch.full((2, 17), -1)), r"accepted_nodes length Lp"),
    ]


BAD = ([("tree_attention",) + c for c in _attn_bad()] + [("draft_head_mlp",) + c for c in _mlp_bad()]
       + [("accept_greedy",) + c for c in _accept_bad("accept_greedy")]
       + [("accept_typical",) + c for c in _accept_bad("accept_typical")] + [("kv_compact",) + c for c in _kv_bad()])


@pytest.mark.parametrize("op,what,args,match", BAD, ids=[f"{b[0]}-{b[1]}" for b in BAD])
def test_bad_inputs(device, op, what, args, match):
    require_kernel(op, device)
    args = [a.to(device) if isinstance(a, torch.Tensor) else [x.to(device) for x in a] if isinstance(a, list)
            else a for a in args]
    with pytest.raises(RuntimeError, match=match):
        getattr(ops, op)(*args)


# (op, index of a tensor argument moved to the CPU, its name) for the device-mismatch checks
MISMATCH = [
    ("tree_attention", 1, "k_cache"), ("tree_attention", 3, "cache_lens"), ("tree_attention", 4, "tree_mask"),
    ("draft_head_mlp", 2, "embed"), ("draft_head_mlp", 1, "path_tokens"),
    ("accept_greedy", 1, "candidates"), ("accept_greedy", 2, "paths"),
    ("accept_typical", 3, "uniform"), ("kv_compact", 3, "accepted_nodes"), ("kv_compact", 1, "v_cache"),
]


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_ready(), reason="needs a CUDA device and hydra_fast._C built with CUDA")
@pytest.mark.parametrize("op,index,name", MISMATCH)
def test_device_mismatch(op, index, name):
    require_kernel(op, "cuda")
    assert_names_cpu_argument(getattr(ops, op), small_inputs(op, "cuda"), index, name)

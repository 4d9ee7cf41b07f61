"""Tree ops with one tree per sequence: tree_mask [B, N, N], paths [B, P, L], first_child / next_sibling [B, N].

Row b of a batched call must equal the shared-tree call on sequence b alone with row b's tree (reference, CPU
kernel, CUDA kernel); a batched descriptor that repeats one tree must give bit-identical results to the shared
form; the batched forms pass opcheck, torch.compile(fullgraph=True), CUDA-graph capture and the shape checks.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import pytest
import torch

from conftest import (
    DTYPES, assert_close_by_dtype, cuda_ready, generator, needs_extension, noncontiguous, randn, replay_cuda_graph,
    require_kernel,
)
from hydra_fast import ops, reference
from hydra_fast.tree import Tree


def seed_of(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def random_tree(num_nodes: int, gen: torch.Generator, max_depth: int) -> Tree:
    """A random Tree of num_nodes nodes (root included) and depth <= max_depth: each new node is the next-ranked
    child of a random node that is not yet at max_depth."""
    nodes, kids = [()], {(): 0}
    while len(nodes) < num_nodes:
        parent = nodes[int(torch.randint(0, len(nodes), (1,), generator=gen))]
        if len(parent) < max_depth:
            child = parent + (kids[parent],)
            kids[parent] += 1
            kids[child] = 0
            nodes.append(child)
    return Tree.from_choices([list(n) for n in nodes[1:]])


@dataclass(frozen=True)
class BatchedTrees:
    """B trees of N nodes as per-sequence descriptors, paths padded to P = N paths of L = max_depth + 1 nodes."""

    trees: list[Tree]
    tree_mask: torch.Tensor  # bool [B, N, N]
    paths: torch.Tensor  # int64 [B, N, L]: -1 padded, then root-only paths [0, -1, ...]
    first_child: torch.Tensor  # int64 [B, N]
    next_sibling: torch.Tensor  # int64 [B, N]
    max_depth: int


def batched_trees(B: int, N: int, gen: torch.Generator, device, max_depth: int = 5) -> BatchedTrees:
    max_depth = min(max_depth, N - 1)
    trees = [random_tree(N, gen, max_depth) for _ in range(B)]
    bufs = [t.buffers(device) for t in trees]
    L = max_depth + 1
    paths = torch.full((B, N, L), -1, dtype=torch.long, device=device)
    paths[:, :, 0] = 0
    for b, buf in enumerate(bufs):
        paths[b, :buf.paths.shape[0], :buf.paths.shape[1]] = buf.paths
    if B > 1 and N > 2:
        assert any(t.nodes != trees[0].nodes for t in trees[1:]), "draw trees that differ between sequences"
    return BatchedTrees(trees, torch.stack([b.tree_mask for b in bufs]), paths,
                        torch.stack([b.first_child for b in bufs]), torch.stack([b.next_sibling for b in bufs]),
                        max_depth)


def impl_of(name: str, op: str, device):
    if name == "reference":
        return reference
    require_kernel(op, device)
    return ops


IMPLS = ["reference", pytest.param("kernel", marks=needs_extension)]


def assert_rows_equal(batched, rows):
    """Each output of a batched call equals the concatenation of the per-sequence calls' outputs, exactly."""
    for got, per_row in zip(batched, zip(*rows)):
        assert torch.equal(got, torch.cat(per_row)), (got, per_row)


# ---------------------------------------------------------------------------------------------------------------
# tree_attention


def attention_inputs(B, Hq, Hkv, N, S, D, lens, dtype, device, seed):
    gen = generator(seed)
    q = randn((B, N, Hq, D), dtype, device, gen).transpose(1, 2)  # [B, Hq, N, D], the projection's layout
    k_cache = randn((B, Hkv, S + 3, D), dtype, device, gen)[:, :, :S]  # [B, Hkv, S, D], strided
    v_cache = randn((B, Hkv, S + 3, D), dtype, device, gen)[:, :, :S]
    cache_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    trees = batched_trees(B, N, gen, device)
    return [q, k_cache, v_cache, cache_lens, trees.tree_mask, 1.0 / math.sqrt(D)]


ATTN_CASES = [
    # B, Hq, Hkv, N, S, D, cache_lens
    (3, 4, 2, 7, 83, 64, [0, 76, 30]),
    (2, 6, 2, 64, 400, 128, [300, 17]),  # GQA 3
    (3, 4, 1, 31, 769, 64, [686, 0, 333]),  # GQA 4, odd N and S
    (1, 16, 2, 128, 1200, 128, [1000]),  # a long context: split over KV chunks on CUDA
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: "B{}-H{}x{}-N{}-S{}-D{}".format(*c[:6]))
def test_tree_attention_rows(device, impl, dtype, case):
    impl = impl_of(impl, "tree_attention", device)
    B, Hq, Hkv, N, S, D, lens = case
    q, k, v, cache_lens, tree_mask, scale = attention_inputs(B, Hq, Hkv, N, S, D, lens, dtype, device,
                                                             seed_of("attn", case, dtype))
    out = impl.tree_attention(q, k, v, cache_lens, tree_mask, scale)
    assert out.shape == (B, N, Hq, D) and torch.isfinite(out).all()
    for b in range(B):
        one = slice(b, b + 1)
        want = impl.tree_attention(q[one], k[one], v[one], cache_lens[one], tree_mask[b], scale)
        assert_close_by_dtype(out[one], want)
    if dtype == torch.float32 and impl is ops:
        assert_close_by_dtype(out, reference.tree_attention(q, k, v, cache_lens, tree_mask, scale))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_tree_attention_sees_exactly_each_mask(device, dtype):
    require_kernel("tree_attention", device)
    # V is one-hot per position, so each query's output is its softmax weight per position: zero exactly outside
    # the cache and the query's ancestors in its own sequence's tree.
    B, H, N, S, D = 3, 2, 7, 24, 64
    lens = [4, 0, 17]
    gen = generator(seed_of("mask", dtype))
    q = randn((B, H, N, D), dtype, device, gen)
    k_cache = randn((B, H, S, D), dtype, device, gen)
    v_cache = torch.zeros(B, H, S, D, dtype=dtype, device=device)
    v_cache[:, :, torch.arange(S), torch.arange(S)] = 1.0
    tree_mask = batched_trees(B, N, gen, device).tree_mask
    cache_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    weights = ops.tree_attention(q, k_cache, v_cache, cache_lens, tree_mask, 0.125)[..., :S]  # [B, N, H, S]
    for b, length in enumerate(lens):
        visible = torch.zeros(N, S, dtype=torch.bool, device=device)
        visible[:, :length] = True
        visible[:, length:length + N] = tree_mask[b]
        seen = visible.unsqueeze(1).expand(N, H, S)
        assert (weights[b][~seen] == 0).all() and (weights[b][seen] > 0).all()


# ---------------------------------------------------------------------------------------------------------------
# accept_greedy, accept_typical, accept_sample


def accept_inputs(B, N, V, dtype, device, seed):
    """logits [B, N, V], candidates drafted from each sequence's own parents (80 % the right token), trees."""
    gen = generator(seed)
    trees = batched_trees(B, N, gen, device)
    logits = randn((B, N, V), dtype, device, gen, scale=4.0)
    if B > 1:
        logits = noncontiguous(logits, dim=0)
    parents = torch.tensor([t.parents for t in trees.trees]).clamp(min=0)  # [B, N]
    parent_argmax = torch.gather(logits.float().argmax(-1).cpu(), 1, parents)  # [B, N]
    right = torch.rand(B, N, generator=gen) < 0.8
    candidates = torch.where(right, parent_argmax, torch.randint(0, V, (B, N), generator=gen)).to(device)
    return logits, candidates, trees, torch.rand(B, generator=gen).to(device)


def sample_inputs(B, N, V, device, seed):
    """probs [B, N, V] with filtered (zero) entries, candidates sampled from each sequence's parents, uniforms."""
    gen = generator(seed)
    trees = batched_trees(B, N, gen, device)
    logits = torch.randn(B, N, V, generator=gen) * 3
    logits[torch.rand(B, N, V, generator=gen) < 0.3] = float("-inf")
    logits[..., 0] = logits[..., 0].clamp(min=0)  # one token always survives
    probs = logits.softmax(-1)
    parents = torch.tensor([t.parents for t in trees.trees]).clamp(min=0)  # [B, N]
    parent_rows = probs[torch.arange(B).view(B, 1), parents]  # [B, N, V]
    sampled = torch.multinomial(parent_rows.reshape(B * N, V), 1, generator=gen).view(B, N)
    cand = torch.where(torch.rand(B, N, generator=gen) < 0.7, sampled, sampled.roll(1, dims=1))  # some duplicates
    return probs.to(device), cand.to(device), trees, torch.rand(B, N, generator=gen).to(device)


ACCEPT_CASES = [(1, 1, 7), (3, 7, 83), (3, 64, 769), (2, 128, 4096 + 32)]  # B, N, V
T, EPS, ALPHA = 0.7, 0.09, 0.3


def descriptors(op: str, trees: BatchedTrees) -> tuple[torch.Tensor, ...]:
    """op's per-sequence tree descriptors: (paths [B, P, L],) or (first_child [B, N], next_sibling [B, N])."""
    return (trees.first_child, trees.next_sibling) if op == "accept_sample" else (trees.paths,)


def run_accept(op: str, impl, inputs, desc, one=slice(None)):
    """op on sequences `one` of inputs with the tree descriptors desc (shared or per sequence)."""
    data, cand, trees, u = inputs
    if op == "accept_sample":
        return impl.accept_sample(data[one], cand[one], *desc, u[one], trees.max_depth)
    if op == "accept_greedy":
        return impl.accept_greedy(data[one], cand[one], *desc)
    return impl.accept_typical(data[one], cand[one], *desc, u[one], T, EPS, ALPHA)


def accept_call(op: str, impl, inputs, b=None):
    """op on all sequences with their own trees (b None), or on sequence b alone with its tree as the shared one."""
    desc = descriptors(op, inputs[2])
    if b is None:
        return run_accept(op, impl, inputs, desc)
    return run_accept(op, impl, inputs, tuple(d[b] for d in desc), slice(b, b + 1))


def op_inputs(op, case, dtype, device):
    B, N, V = case
    if op == "accept_sample":
        return sample_inputs(B, N, V, device, seed_of(op, case))
    return accept_inputs(B, N, V, dtype, device, seed_of(op, case, dtype))


def check_paths_of_own_tree(trees: BatchedTrees, candidates, accept_len, out_tokens, accepted_nodes):
    """Sequence b's accepted nodes form a root-to-node path of its own tree, out_tokens their drafted tokens."""
    for b, tree in enumerate(trees.trees):
        a = int(accept_len[b])
        nodes = accepted_nodes[b].tolist()
        assert nodes[0] == 0 and all(n == -1 for n in nodes[a + 1:])
        for j in range(1, a + 1):
            assert tree.parents[nodes[j]] == nodes[j - 1]
            assert int(out_tokens[b, j - 1]) == int(candidates[b, nodes[j]])


ACCEPT_OPS = ["accept_greedy", "accept_typical", "accept_sample"]


# accept_sample takes float32 probabilities only: it has no bf16 case
OP_DTYPES = [(op, dt) for op in ACCEPT_OPS for dt in (torch.float32, torch.bfloat16)
             if op != "accept_sample" or dt == torch.float32]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", ACCEPT_CASES, ids=lambda c: "B{}-N{}-V{}".format(*c))
@pytest.mark.parametrize("op, dtype", OP_DTYPES, ids=lambda v: v if isinstance(v, str) else str(v).split(".")[-1])
def test_accept_rows(device, op, impl, dtype, case):
    impl = impl_of(impl, op, device)
    inputs = op_inputs(op, case, dtype, device)
    got = accept_call(op, impl, inputs)
    assert_rows_equal(got, [accept_call(op, impl, inputs, b) for b in range(case[0])])
    if impl is ops:
        assert_rows_equal(got, [accept_call(op, reference, inputs)])
    check_paths_of_own_tree(inputs[2], inputs[1], *got)
    if case[1] > 7:
        assert int(got[0].max()) > 0, "the inputs should accept some drafts"


# ---------------------------------------------------------------------------------------------------------------
# a batched descriptor that repeats one tree == the shared form, bit for bit


def repeated(t: torch.Tensor, B: int) -> list[torch.Tensor]:
    """t repeated over a new leading batch dim: as a stride-0 view and as its own memory."""
    view = t.expand(B, *t.shape)
    assert view.stride(0) == 0
    return [view, view.contiguous()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_tree_attention_repeated_mask_is_bit_identical(device, dtype):
    require_kernel("tree_attention", device)
    q, k, v, lens, masks, scale = attention_inputs(3, 4, 2, 31, 700, 64, [600, 3, 200], dtype, device,
                                                   seed_of("same-attn", dtype))
    shared = ops.tree_attention(q, k, v, lens, masks[1], scale)
    for batched in repeated(masks[1], 3):
        assert torch.equal(ops.tree_attention(q, k, v, lens, batched, scale), shared)


@pytest.mark.parametrize("op", ACCEPT_OPS)
def test_accept_repeated_tree_is_bit_identical(device, op):
    require_kernel(op, device)
    inputs = op_inputs(op, (3, 64, 769), torch.float32, device)
    one_tree = tuple(d[1] for d in descriptors(op, inputs[2]))  # sequence 1's tree, for every sequence
    shared = run_accept(op, ops, inputs, one_tree)
    for batched in zip(*(repeated(d, 3) for d in one_tree)):
        assert_rows_equal(run_accept(op, ops, inputs, batched), [shared])


# ---------------------------------------------------------------------------------------------------------------
# opcheck, torch.compile, CUDA graphs, bad shapes: small batched inputs of every tree op

TREE_OPS = ["tree_attention"] + ACCEPT_OPS


def small_batched(op: str, device, seed: int = 0) -> list:
    """Small valid arguments of op with one tree per sequence (B = 2, N = 7; fresh values per seed)."""
    if op == "tree_attention":
        return attention_inputs(2, 4, 2, 7, 16, 64, [3, 9], torch.float32, device, seed_of("small", op, seed))
    seed = seed_of("small", op, seed)
    if op == "accept_sample":
        probs, cand, trees, u = sample_inputs(2, 7, 19, device, seed)
        return [probs, cand, trees.first_child, trees.next_sibling, u, 6]  # max_depth N - 1: fits any tree
    logits, cand, trees, u = accept_inputs(2, 7, 19, torch.float32, device, seed)
    if op == "accept_greedy":
        return [logits, cand, trees.paths]
    return [logits, cand, trees.paths, u, T, EPS, ALPHA]


@needs_extension
@pytest.mark.parametrize("op", TREE_OPS)
def test_opcheck(device, op):
    require_kernel(op, device)
    torch.library.opcheck(getattr(torch.ops.hydra_fast, op).default, small_batched(op, device))


@needs_extension
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(device, backend):
    for op in TREE_OPS:
        require_kernel(op, device)
    inputs = [small_batched(op, device) for op in TREE_OPS]

    def step(attn, greedy, typical, sample):
        return (ops.tree_attention(*attn), ops.accept_greedy(*greedy), ops.accept_typical(*typical),
                ops.accept_sample(*sample))

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    got, want = compiled(*inputs), step(*inputs)
    assert torch.equal(got[0], want[0])
    for g, w in zip(got[1:], want[1:]):
        assert_rows_equal(g, [w])


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_ready(), reason="needs a CUDA device and hydra_fast._C built with CUDA")
@pytest.mark.parametrize("op", TREE_OPS)
def test_cuda_graph(op):
    # Capture with one set of trees, refill the descriptors with other trees of the same shape, replay.
    require_kernel(op, "cuda")
    static_out, want, _, _ = replay_cuda_graph(getattr(ops, op), small_batched(op, "cuda", seed=1),
                                               small_batched(op, "cuda", seed=2))
    for g, w in zip(static_out if isinstance(static_out, tuple) else (static_out,),
                    want if isinstance(want, tuple) else (want,)):
        assert torch.equal(g, w)


def _with(args: list, index: int, value) -> list:
    args = list(args)
    args[index] = value
    return args


def _cat(t: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
    return torch.cat([t, extra])


# (op, what is wrong, argument index, how to break it, the error it must raise)
BAD = [
    ("tree_attention", "mask batch", 4, lambda m: _cat(m, m[:1]), r"tree_mask.size\(0\) must be B from q = 2, got 3"),
    ("tree_attention", "mask rank", 4, lambda m: m.unsqueeze(0),
     r"tree_mask must have 2 dims \[N, N\] .* or 3 dims \[B, N, N\] .*got 4"),
    ("tree_attention", "mask N", 4, lambda m: m[:, :, :6], r"tree_mask.size\(2\) must be N from q"),
    ("accept_greedy", "paths batch", 2, lambda p: p[:1], r"paths.size\(0\) must be B from logits"),
    ("accept_greedy", "paths rank", 2, lambda p: p.unsqueeze(0),
     r"paths must have 2 dims \[P, L\] .* or 3 dims \[B, P, L\]"),
    ("accept_greedy", "no paths", 2, lambda p: p[:, :0], r"at least one path"),
    ("accept_typical", "paths batch", 2, lambda p: _cat(p, p[:1]), r"paths.size\(0\) must be B from logits"),
    ("accept_sample", "first_child batch", 2, lambda f: f[:1], r"first_child.size\(0\) must be B from probs"),
    ("accept_sample", "first_child N", 2, lambda f: f[:, :6], r"first_child.size\(1\) must be N from probs"),
    ("accept_sample", "links shapes differ", 3, lambda n: n[0], r"next_sibling must have first_child's shape"),
]


@needs_extension
@pytest.mark.parametrize("op,what,index,breaks,match", BAD, ids=[f"{c[0]}-{c[1]}" for c in BAD])
def test_bad_shapes(device, op, what, index, breaks, match):
    require_kernel(op, device)
    args = small_batched(op, device)
    with pytest.raises(RuntimeError, match=match):
        getattr(ops, op)(*_with(args, index, breaks(args[index])))

"""dynamic_tree_layout: the dynamic draft tree's selection and layout in one op, against its pure-PyTorch twin.

A hand-built case with exact outputs; the kept set is the top ``nodes`` by (score desc, candidate index asc),
ties included; then the kernels equal the reference exactly (every output) on random candidates drafted the way
``dynamic_tree.expand`` drafts them (levels, frontier parents, strictly falling scores, ties between unrelated
candidates), strided inputs, special floats; opcheck, torch.compile(fullgraph=True), CUDA-graph replay with
new inputs, and bad inputs refused with what to do.
"""
from __future__ import annotations

import zlib

import pytest
import torch

from conftest import (
    assert_names_cpu_argument, cuda_ready, generator, needs_extension, noncontiguous, replay_cuda_graph, require_kernel,
)
from hydra_fast import ops, reference
from hydra_fast.dynamic_tree import MIN_STEP, DynamicTree

OUTPUTS = ("kept", "paths", "tree_mask", "depth", "first_child", "next_sibling")
IMPLS = ["reference", pytest.param("kernel", marks=needs_extension)]


def impl_of(name: str, device):
    if name == "reference":
        return reference
    require_kernel("dynamic_tree_layout", device)
    return ops


def seed_of(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def drafts(B: int, tree: DynamicTree, gen: torch.Generator, device, ties: bool = False):
    """score float32 [B, C], parent int64 [B, C], candidate_depth int64 [C] as ``dynamic_tree.expand`` lays them
    out: level 1 is the root's top-k, each further level the top-k children of the level's ``width`` best nodes,
    each level lowering the score by >= MIN_STEP. ``ties``: log-probabilities on a grid of quarters, so unrelated
    candidates tie often (sums of quarters are exact in float32)."""
    K, W = tree.topk, tree.width

    def logp(shape):
        x = -torch.rand(shape, generator=gen) * 3
        x = -(torch.ceil(-x * 4) / 4) if ties else x
        return x.clamp(max=-MIN_STEP)

    score = logp((B, K))
    scores, parents, offset = [score], [torch.full((B, K), -1)], 0
    for _ in range(2, tree.depth + 1):
        f_score, f = torch.topk(score, W, dim=-1)  # [B, W]
        parents.append((f + offset).view(B, W, 1).expand(B, W, K).reshape(B, W * K))
        offset += score.shape[1]
        score = (f_score.view(B, W, 1) + logp((B, W, K))).reshape(B, W * K)
        scores.append(score)
    depth = tree.buffers(device).candidate_depth
    return torch.cat(scores, 1).to(device), torch.cat(parents, 1).to(device), depth


def layout_args(B: int, tree: DynamicTree, device, seed: int, ties: bool = False) -> list:
    score, parent, depth = drafts(B, tree, generator(seed), device, ties)
    return [score, parent, depth, tree.nodes, tree.context_len, tree.max_depth]


def assert_same_layout(got, want):
    for name, g, w in zip(OUTPUTS, got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, (name, g.dtype, g.shape, w.dtype, w.shape)
        assert torch.equal(g, w), name


# ---------------------------------------------------------------------------------------------------------------
# exact cases


@pytest.mark.parametrize("impl", IMPLS)
def test_hand_built_tree(device, impl):
    impl = impl_of(impl, device)
    # candidates 0, 1: the root's children; 2, 3: children of 0; 4: child of 1. Keep 3 and add a context chain
    # of 2: nodes 1, 2, 3 = candidates 0, 1, 2 (candidate order), nodes 4, 5 = the chain.
    score = torch.tensor([[-1.0, -2.0, -1.5, -3.0, -2.5]], device=device)
    parent = torch.tensor([[-1, -1, 0, 0, 1]], device=device)
    cdepth = torch.tensor([1, 1, 2, 2, 2], device=device)
    kept, paths, mask, depth, first_child, next_sibling = impl.dynamic_tree_layout(score, parent, cdepth, 3, 2, 2)
    assert kept.tolist() == [[0, 1, 2]]
    assert paths.tolist() == [[[0, -1, -1], [0, 1, -1], [0, 2, -1], [0, 1, 3], [0, 4, -1], [0, 4, 5]]]
    assert depth.tolist() == [[0, 1, 1, 2, 1, 2]]
    assert first_child.tolist() == [[1, 3, -1, -1, 5, -1]]
    assert next_sibling.tolist() == [[-1, 2, 4, -1, -1, -1]]
    want_mask = [[j in [n for n in row if n >= 0] for j in range(6)] for row in paths[0].tolist()]
    assert mask.tolist() == [want_mask]


@pytest.mark.parametrize("impl", IMPLS)
def test_ties_keep_the_lower_candidate_index(device, impl):
    impl = impl_of(impl, device)
    # four children of the root tie at -1; their children tie with each other and with candidate 7 at -2
    score = torch.tensor([[-1.0, -1.0, -1.0, -1.0, -2.0, -2.0, -2.0, -2.0]], device=device)
    parent = torch.tensor([[-1, -1, -1, -1, 2, 2, 0, -1]], device=device)
    cdepth = torch.tensor([1, 1, 1, 1, 2, 2, 2, 1], device=device)
    assert impl.dynamic_tree_layout(score, parent, cdepth, 2, 0, 2)[0].tolist() == [[0, 1]]
    assert impl.dynamic_tree_layout(score, parent, cdepth, 6, 0, 2)[0].tolist() == [[0, 1, 2, 3, 4, 5]]
    kept, paths = impl.dynamic_tree_layout(score, parent, cdepth, 7, 0, 2)[:2]
    assert kept.tolist() == [[0, 1, 2, 3, 4, 5, 6]]
    assert paths[0, 5].tolist() == [0, 3, 5] and paths[0, 7].tolist() == [0, 1, 7]  # 4, 5 under 2; 6 under 0


# ---------------------------------------------------------------------------------------------------------------
# random drafts: the kept set by brute force, kernels == reference


TREES = [  # nodes, depth, topk, width, context_len
    (1, 1, 1, 1, 0),
    (5, 2, 3, 2, 0),
    (12, 3, 4, 2, 2),
    (63, 4, 8, 8, 0),  # the default: C = 200, N = 64
    (63, 4, 8, 8, 8),  # with a context chain: N = 72, max_depth 8
    (100, 6, 10, 6, 3),  # C = 310
    (200, 5, 16, 16, 12),  # C = 1040, N = 213
    (511, 4, 32, 24, 0),  # C = 2336, N = 512: the CUDA kernel's node limit
]
TREE_IDS = ["n{}-d{}-k{}-w{}-ctx{}".format(*t) for t in TREES]


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("spec", TREES, ids=TREE_IDS)
def test_reference_keeps_the_top_nodes_as_a_tree(spec, B, ties):
    tree = DynamicTree(*spec)
    score, parent, cdepth, *rest = layout_args(B, tree, "cpu", seed_of("ref", spec, B, ties), ties)
    kept = reference.dynamic_tree_layout(score, parent, cdepth, *rest)[0]
    for b in range(B):
        s = score[b].tolist()
        want = sorted(sorted(range(len(s)), key=lambda c: (-s[c], c))[: tree.nodes])
        assert kept[b].tolist() == want
        kept_set = set(want)
        assert all(int(parent[b, c]) in kept_set | {-1} for c in want), "a kept node's parent is kept"
    if ties and tree.nodes > 5:
        assert any(len(set(score[b].tolist())) < score.shape[1] for b in range(B)), "the draw should tie"


@pytest.mark.parametrize("impl", [pytest.param("kernel", marks=needs_extension)])
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("spec", TREES, ids=TREE_IDS)
def test_kernel_equals_reference(device, impl, spec, B, ties):
    impl = impl_of(impl, device)
    args = layout_args(B, DynamicTree(*spec), device, seed_of("kernel", spec, B, ties), ties)
    assert_same_layout(impl.dynamic_tree_layout(*args), reference.dynamic_tree_layout(*args))


@needs_extension
def test_kernel_strided_inputs(device):
    require_kernel("dynamic_tree_layout", device)
    score, parent, cdepth, *rest = layout_args(3, DynamicTree(30, 4, 5, 4, 2), device, seed_of("strided"), True)
    strided = [noncontiguous(score), noncontiguous(parent), torch.stack([cdepth, -cdepth], 1)[:, 0]]
    assert not strided[2].is_contiguous()
    want = reference.dynamic_tree_layout(score, parent, cdepth, *rest)
    assert_same_layout(ops.dynamic_tree_layout(*strided, *rest), want)
    assert_same_layout(reference.dynamic_tree_layout(*strided, *rest), want)


@needs_extension
def test_kernel_orders_special_floats_as_torch_sort(device):
    require_kernel("dynamic_tree_layout", device)
    # NaN ranks above +inf, -0.0 ties with +0.0, -inf last: the order of torch.sort(descending=True, stable=True)
    values = [0.0, -0.0, float("nan"), float("-inf"), float("inf"), -0.0, 0.0, -1.0, float("nan"), -1.0]
    score = torch.tensor([values, values[::-1]], device=device)
    parent = torch.full((2, 10), -1, device=device)
    cdepth = torch.ones(10, dtype=torch.long, device=device)
    for nodes in range(1, 11):
        args = [score, parent, cdepth, nodes, 1, 1]
        assert_same_layout(ops.dynamic_tree_layout(*args), reference.dynamic_tree_layout(*args))


@needs_extension
def test_broken_parents_read_as_the_root(device):
    require_kernel("dynamic_tree_layout", device)
    # parents out of range, or not kept: the kernels agree with the reference, without reading out of bounds
    gen = generator(seed_of("broken"))
    C = 40
    score = torch.randn(2, C, generator=gen).to(device)
    parent = torch.randint(-3, C + 3, (2, C), generator=gen).to(device)
    cdepth = torch.randint(1, 4, (C,), generator=gen).to(device)
    args = [score, parent, cdepth, 15, 2, 3]
    assert_same_layout(ops.dynamic_tree_layout(*args), reference.dynamic_tree_layout(*args))


# ---------------------------------------------------------------------------------------------------------------
# opcheck, torch.compile, CUDA graphs


SMALL = DynamicTree(12, 3, 4, 3, 2)


@needs_extension
def test_opcheck(device):
    require_kernel("dynamic_tree_layout", device)
    args = layout_args(2, SMALL, device, seed_of("opcheck"), ties=True)
    torch.library.opcheck(torch.ops.hydra_fast.dynamic_tree_layout.default, args)


@needs_extension
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(device, backend):
    require_kernel("dynamic_tree_layout", device)
    args = layout_args(2, SMALL, device, seed_of("compile"))

    def step(score, parent, cdepth):  # the op between ordinary ops, as in the decoding step
        out = ops.dynamic_tree_layout(score - 1.0, parent, cdepth, *args[3:])
        return out[0] + 1, *out[1:]

    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True, backend=backend)(*args[:3])
    assert_same_layout(got, step(*args[:3]))


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_ready(), reason="needs a CUDA device and hydra_fast._C built with CUDA")
@pytest.mark.parametrize("spec", [TREES[3], TREES[4], TREES[6]], ids=[TREE_IDS[3], TREE_IDS[4], TREE_IDS[6]])
def test_cuda_graph_replays_with_new_drafts(spec):
    require_kernel("dynamic_tree_layout", "cuda")
    tree = DynamicTree(*spec)
    static = layout_args(3, tree, "cuda", seed_of("graph", 1), ties=True)
    fresh = layout_args(3, tree, "cuda", seed_of("graph", 2), ties=True)
    captured = reference.dynamic_tree_layout(*static)  # before the replay refills the captured inputs
    static_out, want, _, _ = replay_cuda_graph(ops.dynamic_tree_layout, static, fresh)
    assert_same_layout(static_out, want)
    assert_same_layout(want, reference.dynamic_tree_layout(*fresh))
    assert not torch.equal(want[0], captured[0]), "the fresh drafts keep other nodes: the replay used them"


# ---------------------------------------------------------------------------------------------------------------
# bad inputs


def _replace(args: list, index: int, value) -> list:
    args = list(args)
    args[index] = value
    return args


BAD = [  # what is wrong, argument index, how to break it, the error it must raise
    ("score fp16", 0, lambda s: s.half(), r"score must be float32"),
    ("score 1-d", 0, lambda s: s[0], r"score must have 2 dims \[B, C\]"),
    ("parent int32", 1, lambda p: p.int(), r"parent must be Long"),
    ("parent batch", 1, lambda p: p[:1], r"parent.size\(0\) must be B from score = 2, got 1"),
    ("parent C", 1, lambda p: p[:, :-1], r"parent.size\(1\) must be C from score"),
    ("depth C", 2, lambda d: d[:-1], r"candidate_depth.size\(0\) must be C from score"),
    ("depth 2-d", 2, lambda d: d.view(1, -1), r"candidate_depth must have 1 dims \[C\]"),
    ("no nodes", 3, lambda n: 0, r"nodes must be in \[1, C = 28\] .*got 0"),
    ("too many nodes", 3, lambda n: 29, r"nodes must be in \[1, C = 28\] .*got 29"),
    ("negative context", 4, lambda m: -1, r"context_len must be >= 0, got -1"),
    ("shallow", 5, lambda d: 1, r"max_depth must be >= 1 and >= context_len \(2"),
]


@needs_extension
@pytest.mark.parametrize("what,index,breaks,match", BAD, ids=[c[0] for c in BAD])
def test_bad_inputs(device, what, index, breaks, match):
    require_kernel("dynamic_tree_layout", device)
    args = layout_args(2, SMALL, device, seed_of("bad"))
    with pytest.raises(RuntimeError, match=match):
        ops.dynamic_tree_layout(*_replace(args, index, breaks(args[index])))


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_ready(), reason="needs a CUDA device and hydra_fast._C built with CUDA")
@pytest.mark.parametrize("index,name", [(1, "parent"), (2, "candidate_depth")])
def test_cuda_inputs_on_another_device(index, name):
    require_kernel("dynamic_tree_layout", "cuda")
    assert_names_cpu_argument(ops.dynamic_tree_layout, layout_args(2, SMALL, "cuda", seed_of("bad")), index, name)


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_ready(), reason="needs a CUDA device and hydra_fast._C built with CUDA")
def test_cuda_limits_are_refused_before_launch():
    require_kernel("dynamic_tree_layout", "cuda")
    big = DynamicTree(600, 3, 100, 100, 0)  # C = 20100 candidates, N = 601 nodes
    score, parent, cdepth, *rest = layout_args(1, big, "cuda", seed_of("big"))
    with pytest.raises(RuntimeError, match=r"at most 8192 candidates per sequence .*got C = 20100"):
        ops.dynamic_tree_layout(score, parent, cdepth, *rest)
    with pytest.raises(RuntimeError, match=r"at most 512 tree nodes .*got N = 1 \+ nodes \+ context_len = 601"):
        ops.dynamic_tree_layout(score[:, :8000], parent[:, :8000], cdepth[:8000], *rest)

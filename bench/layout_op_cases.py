"""bench_ops.py cases of dynamic_tree_layout: the dynamic draft tree's selection and layout.

Trees of the default budget (``dynamic``: 63 nodes of 200 candidates), with a context chain of 8, and a large
one (200 nodes of 1040 candidates), at B = 1 and 4. Byte model: score (4 C) + parent (8 C) + candidate_depth
(8 C) read, kept (8 nodes) + paths (8 N L) + tree mask (N N) + depth, first_child, next_sibling (3 x 8 N)
written, per sequence. Input sets are fresh drafts (levels of top-k children of the best frontier nodes,
scores on a grid of quarters so that unrelated candidates tie). The eager reference is ~45 small ops: the
op exists to replace them with one launch inside the step's CUDA graph; target: faster than
torch.compile(reference).
"""
from __future__ import annotations

import torch

LAYOUT_OPS = ("dynamic_tree_layout",)
TREES = {"full": ("dynamic", "dynamic+ctx8", "dynamic:nodes=200,depth=5,topk=16,width=16+ctx12"),
         "quick": ("dynamic:nodes=12,depth=3,topk=4,width=3+ctx2",)}
BATCHES = {"full": (1, 4), "quick": (1,)}


def _drafts(B: int, tree, seed: int, device) -> dict:
    """score [B, C], parent [B, C] as dynamic_tree.expand lays them out, each level lowering the score by at least
    a quarter (scores on a grid of quarters: ties between unrelated candidates)."""
    g = torch.Generator(device=device).manual_seed(seed)
    K, W = tree.topk, tree.width
    step = lambda *shape: -torch.randint(1, 12, shape, generator=g, device=device).float() / 4  # noqa: E731
    level = step(B, K)
    scores, parents, first = [level], [torch.full((B, K), -1, device=device)], 0
    for _ in range(tree.depth - 1):
        best, f = torch.topk(level, W, dim=-1)  # [B, W] the frontier
        parents.append((f + first).view(B, W, 1).expand(B, W, K).reshape(B, W * K))
        first += level.shape[1]
        level = (best.view(B, W, 1) + step(B, W, K)).reshape(B, W * K)
        scores.append(level)
    return dict(score=torch.cat(scores, 1), parent=torch.cat(parents, 1))


def layout_cases(sizes, device, runner) -> list:
    import common as C
    import op_cases as O
    from hydra_fast import ops, reference
    from hydra_fast.tree import Tree

    preset = "quick" if sizes is O.SIZES["quick"] else "full"
    cases = []
    for spec in TREES[preset]:
        tree = Tree.from_choices(spec)
        depth = tree.buffers(device).candidate_depth  # [C]
        Cn, N, L = depth.shape[0], tree.num_nodes, tree.max_depth + 1
        args = (tree.nodes, tree.context_len, tree.max_depth)
        for B in BATCHES[preset]:
            nbytes = B * (20 * Cn + 8 * tree.nodes + 8 * N * L + N * N + 24 * N)

            def call(s, impl, depth=depth, args=args):
                return impl(s["score"], s["parent"], depth, *args)

            ours = lambda s, call=call: call(s, ops.dynamic_tree_layout)  # noqa: E731
            ref = lambda s, impl=reference.dynamic_tree_layout, call=call: call(s, impl)  # noqa: E731
            cases.append(O.Case(
                op="dynamic_tree_layout", label=dict(tree=spec, B=B, C=Cn, N=N), nbytes=nbytes, flops=0,
                notes="score + parent + candidate_depth read, kept + paths + tree mask + depth + child lists "
                      "written; fresh drafts per input set, scores on a grid of quarters (ties). Target: faster "
                      "than torch.compile(reference).",
                make_set=lambda i, B=B, tree=tree: _drafts(B, tree, 7000 + i, device), bytes_per_set=nbytes,
                truth=ref, check=C.compare_exact, methods=O._std_methods("dynamic_tree_layout", runner, ours, ref)))
    return cases


LAYOUT_BUILDERS = {"dynamic_tree_layout": layout_cases}

"""Dynamic draft trees: each step the tree's shape follows the heads' own confidence (EAGLE-2's idea, adapted
to heads that read the tokens drafted before them).

A static tree drafts the same ranks every step, whether the heads are sure or not. A dynamic tree expands,
level by level, the ``width`` most probable frontier nodes (by cumulative draft log-probability, the product
of the heads' probabilities along the path): head d - 1 runs on each kept node's path, batched, and proposes its
``topk`` children. Of all the candidates drafted this way, the ``nodes`` best by cumulative log-probability are
verified. The cumulative score falls strictly along every path, so a kept node's parent is always kept: the
selection is a tree. Shapes are fixed by (B, nodes, depth, topk, width), the tree is built on the device with
no host reads, and the whole step is still captured as one CUDA graph.

Each sequence of a batch gets its own tree, so the step's tree descriptors carry a batch dimension
(``StepTree``): the tree ops take per-sequence masks, paths and child lists. Verification is unchanged, so
greedy output is the base model's, and lossless sampling stays exact (the children are a deterministic function
of the context, which is all the point-mass rule of ``accept_sample`` needs).

A context chain (``context_len`` nodes, ``hydra_fast.context``) hangs off the root after the heads' nodes, as
in static trees. Spec strings: ``"dynamic"`` (the defaults below) or ``"dynamic:nodes=63,depth=4,topk=8,
width=8"`` with any subset of the fields, each optionally followed by ``"+ctxM"``.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, fields, replace

import torch

from hydra_fast.ops import row_topk

PREFIX = "dynamic"
MIN_STEP = 1e-4  # each level lowers the cumulative score by at least this much: parents rank above children


@dataclass(frozen=True)
class StepTree:
    """One step's tree as the ops read it: shared [N]/[N, N]/[P, L] (static trees) or per sequence with a
    leading batch dimension (dynamic trees)."""

    depth: torch.Tensor  # int64 [N] or [B, N]
    tree_mask: torch.Tensor  # bool [N, N] or [B, N, N]
    paths: torch.Tensor  # int64 [P, L] or [B, P, L]
    first_child: torch.Tensor  # int64 [N] or [B, N]
    next_sibling: torch.Tensor  # int64 [N] or [B, N]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The fields in order (the tensors themselves, not copies)."""
        return tuple(getattr(self, f.name) for f in fields(self))


@dataclass(frozen=True)
class DynamicTree:
    """A dynamic tree's budget: ``nodes`` heads' nodes besides the root, drafted ``depth`` levels deep, each
    expanded node proposing its ``topk`` children, ``width`` nodes expanded per level; then ``context_len``
    context-chain nodes."""

    nodes: int = 63
    depth: int = 4
    topk: int = 8
    width: int = 8
    context_len: int = 0

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            low = 0 if f.name == "context_len" else 1
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
                raise ValueError(f"dynamic tree: {f.name} must be an int >= {low}, got {v!r}")
        if self.width > self.topk:
            raise ValueError(f"dynamic tree: width ({self.width}) cannot exceed topk ({self.topk}): a level has only "
                             f"topk candidates per expanded node to choose the next frontier from")
        if self.nodes > self.num_candidates:
            raise ValueError(f"dynamic tree: {self.nodes} nodes asked for but depth {self.depth}, topk {self.topk} "
                             f"and width {self.width} draft only {self.num_candidates} candidates: lower nodes or "
                             f"raise topk/width/depth")

    @classmethod
    def parse(cls, spec: str) -> DynamicTree:
        """``"dynamic"`` or ``"dynamic:nodes=63,depth=4,topk=8,width=8"`` (any subset of the fields)."""
        if spec == PREFIX:
            return cls()
        head, sep, body = spec.partition(":")
        if head != PREFIX or not sep:
            raise ValueError(f"not a dynamic tree spec: {spec!r} (expected 'dynamic' or 'dynamic:nodes=63,depth=4')")
        known = {"nodes", "depth", "topk", "width"}
        values = {}
        for item in filter(None, (s.strip() for s in body.split(","))):
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq or key not in known or not value.strip().isdigit():
                raise ValueError(f"dynamic tree spec {spec!r}: {item!r} is not one of "
                                 f"{', '.join(sorted(known))} = a non-negative int")
            values[key] = int(value)
        return cls(**values)

    @property
    def spec(self) -> str:
        """The spec string this tree parses from (without the context chain)."""
        return f"{PREFIX}:nodes={self.nodes},depth={self.depth},topk={self.topk},width={self.width}"

    def with_context(self, context_len: int) -> DynamicTree:
        return replace(self, context_len=context_len)

    @property
    def num_candidates(self) -> int:
        return self.topk + (self.depth - 1) * self.width * self.topk

    @property
    def num_nodes(self) -> int:
        return 1 + self.nodes + self.context_len

    @property
    def heads_depth(self) -> int:
        return self.depth

    @property
    def max_depth(self) -> int:
        return max(self.depth, self.context_len)

    def buffers(self, device: torch.device | str = "cpu") -> DynamicBuffers:
        return DynamicBuffers(self, torch.device(device))


class DynamicBuffers:
    """What a dynamic tree keeps on the device: its spec and each candidate's depth."""

    dynamic = True

    def __init__(self, tree: DynamicTree, device: torch.device):
        self.tree = tree
        self.num_nodes = tree.num_nodes
        self.max_depth = tree.max_depth
        self.context_len = tree.context_len
        self.widest = tree.topk  # the most guesses a level takes from one head
        self.device = device
        K, W, D = tree.topk, tree.width, tree.depth
        self.candidate_depth = torch.tensor([1] * K + [d for d in range(2, D + 1) for _ in range(W * K)],
                                            dtype=torch.long, device=device)  # [C]


def expand(heads, hidden: torch.Tensor, root: torch.Tensor, tree: DynamicTree, embed_weight, base_lm_head, impl):
    """Draft every candidate: level 1 is head 0's top-k; each further level expands the ``width`` best nodes of
    the level before. hidden [B, d], root int64 [B].

    -> (tokens int64 [B, C], score float32 [B, C] (cumulative log-probability, strictly falling along paths),
    parent int64 [B, C] (candidate index of each candidate's parent, -1 for the root's children)); candidates are
    laid out level by level, a level's as [frontier node, rank] (``DynamicBuffers.candidate_depth``)."""
    B, dm = hidden.shape
    K, W, D = tree.topk, tree.width, tree.depth
    first = heads.heads[0]
    x = first(hidden, root.view(B, 1)[:, :first.path_len], embed_weight, impl)  # [B, d]
    logp, tok = heads.draft_scores(0, x, base_lm_head, K, impl)  # [B, K] each
    score = logp.clamp(max=-MIN_STEP)
    tokens, scores, parents = [tok], [score], [torch.full_like(tok, -1)]
    path = root.view(B, 1, 1)  # [B, n, d - 1]: tokens root .. each node of the level before (n = 1 at first)
    offset = 0  # candidate index of the level's first candidate
    for d in range(2, D + 1):
        f_score, f = row_topk(score, W, impl)  # [B, W] the frontier, within the level's candidates
        path = torch.cat([path.gather(1, (f // K).view(B, W, 1).expand(B, W, d - 1)),
                          tok.gather(1, f).view(B, W, 1)], dim=-1)  # [B, W, d] root .. frontier node
        head = heads.heads[d - 1]
        if head.path_len == 0:  # no path input: one guess list per sequence, shared by its frontier
            x = head(hidden, root.new_zeros(B, 0), embed_weight, impl)
            logp, tok = (t.view(B, 1, K).expand(B, W, K) for t in heads.draft_scores(d - 1, x, base_lm_head, K, impl))
        else:
            h = hidden.view(B, 1, dm).expand(B, W, dm).reshape(B * W, dm)
            x = head(h, path.reshape(B * W, d)[:, :head.path_len], embed_weight, impl)  # [B * W, d]
            logp, tok = (t.view(B, W, K) for t in heads.draft_scores(d - 1, x, base_lm_head, K, impl))
        parents.append((f + offset).view(B, W, 1).expand(B, W, K).reshape(B, W * K))
        offset += score.shape[1]
        score = (f_score.view(B, W, 1) + logp.clamp(max=-MIN_STEP)).reshape(B, W * K)
        tok = tok.reshape(B, W * K)
        tokens.append(tok)
        scores.append(score)
    return torch.cat(tokens, 1), torch.cat(scores, 1), torch.cat(parents, 1)


def draft(heads, hidden, root, bufs: DynamicBuffers, embed_weight, base_lm_head, impl):
    """A dynamic tree's step: candidates int64 [B, N] (the context nodes' left 0 for the caller) and its
    ``StepTree``, laid out by ``impl.dynamic_tree_layout`` (one launch where the kernels are built)."""
    tree = bufs.tree
    tokens, score, parent = expand(heads, hidden, root, tree, embed_weight, base_lm_head, impl)
    kept, paths, mask, depth, first_child, next_sibling = impl.dynamic_tree_layout(
        score, parent, bufs.candidate_depth, tree.nodes, tree.context_len, tree.max_depth)
    B, M = tokens.shape[0], tree.context_len
    candidates = torch.cat([root.view(B, 1), tokens.gather(1, kept), tokens.new_zeros(B, M)], dim=1)  # [B, N]
    return candidates, StepTree(depth=depth, tree_mask=mask, paths=paths, first_child=first_child,
                                next_sibling=next_sibling)

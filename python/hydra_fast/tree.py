"""Static draft trees: Medusa-style tree choices and the index buffers the draft and verify steps read.

A tree is given by its non-root nodes, each a tuple of child ranks from the root: ``(0,)`` is the root's
top-1 child, ``(0, 2)`` the third-best child of that node. Node 0 is the root (the base model's own next
token); the other nodes follow sorted by (depth, ranks), so a parent's index is always below its children's
and the nodes of one depth are contiguous. All buffers are built once per tree (``Tree.buffers``) and have
shapes fixed by the tree, so a decoding step that reads them can be compiled and captured as a CUDA graph.

A tree may also carry ``context_len`` context nodes: a chain of M nodes hanging off the root, filled each step
with a continuation found in the text itself (``hydra_fast.context``), verified in the same forward pass as
the heads' nodes. They follow the heads' nodes (indices N - M .. N - 1, depth 1 .. M), so the heads' nodes keep
their indices and levels; a preset name takes them as a suffix: ``"mc_sim_7b_63+ctx8"``, ``"plain+ctx8"``.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Sequence, Union

import torch

from hydra_fast.dynamic_tree import PREFIX as DYNAMIC
from hydra_fast.dynamic_tree import DynamicTree, StepTree

Node = tuple[int, ...]
Choices = Union[str, Sequence[Sequence[int]]]


def chain(n: int) -> tuple[Node, ...]:
    """A single path of n top-1 guesses: (0,), (0, 0), ... (the tree of plain n-token drafting)."""
    if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 0:
        raise ValueError(f"chain length must be a non-negative int, got {n!r}")
    return tuple((0,) * i for i in range(1, int(n) + 1))


MC_SIM_7B_63: tuple[Node, ...] = tuple(tuple(c) for c in [
    [0], [0, 0], [1], [0, 1], [2], [0, 0, 0], [1, 0], [0, 2], [3], [0, 3], [4], [0, 4], [2, 0], [0, 5],
    [0, 0, 1], [5], [0, 6], [6], [0, 7], [0, 1, 0], [1, 1], [7], [0, 8], [0, 0, 2], [3, 0], [0, 9], [8], [9],
    [1, 0, 0], [0, 2, 0], [1, 2], [0, 0, 3], [4, 0], [2, 1], [0, 0, 4], [0, 0, 5], [0, 0, 0, 0], [0, 1, 1],
    [0, 0, 6], [0, 3, 0], [5, 0], [1, 3], [0, 0, 7], [0, 0, 8], [0, 0, 9], [6, 0], [0, 4, 0], [1, 4], [7, 0],
    [0, 1, 2], [2, 0, 0], [3, 1], [2, 2], [8, 0], [0, 5, 0], [1, 5], [1, 0, 1], [0, 2, 1], [9, 0], [0, 6, 0],
    [0, 0, 0, 1], [1, 6], [0, 7, 0],
])  # Medusa's released 63-node, depth-4 tree (medusa/model/medusa_choices.py), used by Hydra

PRESETS: dict[str, tuple[Node, ...]] = {
    "mc_sim_7b_63": MC_SIM_7B_63,
    "chain4": chain(4),
    "tiny": ((0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)),
    "plain": (),
}


@dataclass(frozen=True)
class Level:
    """How depth ``depth`` is drafted from depth ``depth - 1``. Pd parents with children, Cd children."""

    depth: int
    topk: int  # max child rank + 1: how many guesses to take per parent
    parent_nodes: torch.Tensor  # int64 [Pd] distinct depth-(d-1) nodes with children, ascending
    parent_paths: torch.Tensor  # int64 [Pd, d] nodes root..parent of each parent (the head's path tokens)
    child_nodes: torch.Tensor  # int64 [Cd] the depth-d nodes, ascending (a contiguous range)
    child_slot: torch.Tensor  # int64 [Cd] index of each child's parent in parent_nodes
    child_rank: torch.Tensor  # int64 [Cd] each child's rank among its parent's guesses


@dataclass(frozen=True)
class TreeBuffers:
    """Device tensors of one tree. N nodes incl. the root, P leaves, L = max_depth + 1."""

    num_nodes: int
    max_depth: int
    depth: torch.Tensor  # int64 [N]
    parents: torch.Tensor  # int64 [N], -1 for the root
    ranks: torch.Tensor  # int64 [N], -1 for the root and the context nodes
    tree_mask: torch.Tensor  # bool [N, N], row i: ancestors of i and i itself
    paths: torch.Tensor  # int64 [P, L] root-to-leaf node indices, -1 padded; [[0]] for the root-only tree
    node_paths: torch.Tensor  # int64 [N, L] nodes root..i for each node i, -1 padded
    levels: tuple[Level, ...]  # levels[d - 1] drafts depth d, d = 1 .. the heads' depth
    first_child: torch.Tensor  # int64 [N] the rank-0-most child of each node, -1 for a leaf
    next_sibling: torch.Tensor  # int64 [N] the next child of the same parent by rank, -1 for the last
    context_len: int = 0  # M: nodes N - M .. N - 1 are the context chain (node N - M's parent is the root)

    dynamic = False  # a static tree: the same shape every step (``DynamicBuffers`` is the other kind)

    @property
    def num_paths(self) -> int:
        return self.paths.shape[0]

    @property
    def widest(self) -> int:
        """The most guesses any level takes from one head (its highest rank + 1; 0 without heads' nodes)."""
        return max((level.topk for level in self.levels), default=0)

    def step_tree(self) -> StepTree:
        """The tree as the ops read it, shared by every sequence."""
        return StepTree(depth=self.depth, tree_mask=self.tree_mask, paths=self.paths, first_child=self.first_child,
                        next_sibling=self.next_sibling)


@dataclass(frozen=True)
class Tree:
    """A static draft tree. ``nodes[0] == ()`` is the root; the heads' nodes sorted by (depth, ranks), then
    ``context_len`` context nodes (a chain off the root, not listed in ``nodes``)."""

    nodes: tuple[Node, ...]
    context_len: int = 0

    @classmethod
    def from_choices(cls, choices: Choices, context_len: int | None = None) -> Tree | DynamicTree:
        """Build from a preset name (see PRESETS, optionally with a ``+ctxM`` suffix), a list of rank tuples
        such as [[0], [0, 0], [1]], or a dynamic tree spec ("dynamic", "dynamic:nodes=63,topk=8": a
        ``DynamicTree``). ``context_len`` (when given) overrides the tree's context chain length."""
        if isinstance(choices, (Tree, DynamicTree)):
            return choices if context_len is None else choices.with_context(context_len)
        suffix_len = 0
        if isinstance(choices, str):
            name, suffix_len = split_context(choices)
            if name.split(":")[0] == DYNAMIC:
                return DynamicTree.parse(name).with_context(suffix_len if context_len is None else context_len)
            if name not in PRESETS:
                raise ValueError(f"unknown tree preset {name!r}; known presets: {', '.join(sorted(PRESETS))} "
                                 "and 'dynamic' (each optionally with a context chain: '+ctx8')")
            choices = PRESETS[name]
        tree = cls._from_nodes(choices)
        return tree.with_context(suffix_len if context_len is None else context_len)

    @classmethod
    def _from_nodes(cls, choices) -> Tree:
        if not isinstance(choices, Sequence):
            raise ValueError(f"tree choices must be a preset name or a list of rank lists, got {type(choices)}")
        nodes = [_validate_node(i, c) for i, c in enumerate(choices)]
        seen: set[Node] = set()
        for i, node in enumerate(nodes):
            if node in seen:
                raise ValueError(f"tree choice #{i} {list(node)} appears more than once")
            seen.add(node)
        for i, node in enumerate(nodes):
            if len(node) > 1 and node[:-1] not in seen:
                raise ValueError(f"tree choice #{i} {list(node)} has no parent: add {list(node[:-1])} to the tree")
        return cls(nodes=((),) + tuple(sorted(nodes, key=lambda n: (len(n), n))))

    @classmethod
    def plain(cls) -> Tree:
        """The root-only tree: no drafts, plain autoregressive decoding."""
        return cls(nodes=((),))

    def with_context(self, context_len: int) -> Tree:
        """This tree with a context chain of ``context_len`` nodes off the root (0: none)."""
        if isinstance(context_len, bool) or not isinstance(context_len, numbers.Integral) or context_len < 0:
            raise ValueError(f"context_len (the context draft length) must be a non-negative int, got "
                             f"{context_len!r}")
        return Tree(nodes=self.nodes, context_len=int(context_len))

    @property
    def num_nodes(self) -> int:
        return len(self.nodes) + self.context_len

    @property
    def heads_depth(self) -> int:
        """Depth of the heads' nodes (the heads this tree needs)."""
        return len(self.nodes[-1])

    @property
    def max_depth(self) -> int:
        return max(self.heads_depth, self.context_len)

    @property
    def parents(self) -> tuple[int, ...]:
        index = {n: i for i, n in enumerate(self.nodes)}
        first = len(self.nodes)  # the context chain: first -> root, then each node -> the one before it
        context = tuple(0 if k == 0 else first + k - 1 for k in range(self.context_len))
        return (-1,) + tuple(index[n[:-1]] for n in self.nodes[1:]) + context

    def ancestors(self, i: int) -> list[int]:
        """Node indices root..i."""
        parents = self.parents
        out = [i]
        while parents[out[-1]] >= 0:
            out.append(parents[out[-1]])
        return out[::-1]

    def buffers(self, device: torch.device | str = "cpu") -> TreeBuffers:
        N, D = self.num_nodes, self.heads_depth
        L = self.max_depth + 1
        parents = self.parents
        has_child = set(parents[1:])
        node_paths = [self.ancestors(i) for i in range(N)]
        leaves = [i for i in range(N) if i not in has_child]
        mask = [[False] * N for _ in range(N)]
        for i, path in enumerate(node_paths):
            for j in path:
                mask[i][j] = True

        def padded(rows: list[list[int]]) -> torch.Tensor:
            return torch.tensor([r + [-1] * (L - len(r)) for r in rows], dtype=torch.long, device=device)

        def longs(values) -> torch.Tensor:
            return torch.tensor(list(values), dtype=torch.long, device=device)

        levels = []
        for d in range(1, D + 1):
            children = [i for i in range(len(self.nodes)) if len(self.nodes[i]) == d]
            parent_nodes = sorted({parents[c] for c in children})
            slot = {p: s for s, p in enumerate(parent_nodes)}
            ranks = [self.nodes[c][-1] for c in children]
            levels.append(Level(
                depth=d,
                topk=max(ranks) + 1,
                parent_nodes=longs(parent_nodes),
                parent_paths=torch.tensor([node_paths[p] for p in parent_nodes], dtype=torch.long,
                                          device=device).view(len(parent_nodes), d),  # [Pd, d]
                child_nodes=longs(children),
                child_slot=longs(slot[parents[c]] for c in children),
                child_rank=longs(ranks),
            ))
        M = self.context_len
        return TreeBuffers(
            num_nodes=N,
            max_depth=self.max_depth,
            depth=longs([len(n) for n in self.nodes] + list(range(1, M + 1))),
            parents=longs(parents),
            ranks=longs([-1] + [n[-1] for n in self.nodes[1:]] + [-1] * M),
            tree_mask=torch.tensor(mask, dtype=torch.bool, device=device),  # [N, N]
            paths=padded([node_paths[i] for i in leaves]),  # [P, L]
            node_paths=padded(node_paths),  # [N, L]
            levels=tuple(levels),
            **self._child_lists(device),
            context_len=M,
        )

    def _child_lists(self, device) -> dict[str, torch.Tensor]:
        """Each node's children in rank order as first-child / next-sibling links (the order in which lossless
        sampling tries them, ``accept_sample``)."""
        N, parents = self.num_nodes, self.parents
        first, nxt = [-1] * N, [-1] * N
        heads_nodes = len(self.nodes)  # context-chain nodes come after: tried after the heads' children

        def rank(c: int) -> float:
            return self.nodes[c][-1] if c < heads_nodes else float("inf")

        for c in sorted(range(1, N), key=rank, reverse=True):
            nxt[c], first[parents[c]] = first[parents[c]], c  # prepend: highest rank first, so rank 0 ends first
        return {"first_child": torch.tensor(first, dtype=torch.long, device=device),
                "next_sibling": torch.tensor(nxt, dtype=torch.long, device=device)}


def split_context(spec: str) -> tuple[str, int]:
    """'name+ctxM' -> ('name', M); anything else -> (spec, 0)."""
    name, sep, suffix = spec.rpartition("+ctx")
    return (name, int(suffix)) if sep and suffix.isdigit() else (spec, 0)


def _validate_node(i: int, choice) -> Node:
    if isinstance(choice, (str, bytes)) or not isinstance(choice, Sequence):
        raise ValueError(f"tree choice #{i} {choice!r} must be a list of child ranks such as [0, 1]")
    if len(choice) == 0:
        raise ValueError(f"tree choice #{i} is empty: the root is implicit, list only non-root nodes")
    for r in choice:
        if isinstance(r, bool) or not isinstance(r, numbers.Integral):
            raise ValueError(f"tree choice #{i} {list(choice)!r}: rank {r!r} is not an int")
        if r < 0:
            raise ValueError(f"tree choice #{i} {list(choice)!r}: rank {r} is negative")
    return tuple(int(r) for r in choice)

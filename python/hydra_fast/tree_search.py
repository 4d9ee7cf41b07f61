"""Draft trees chosen for the heads and the machine: measured acceptance x measured step time.

Greedy acceptance makes this exact in expectation. A node's candidate token depends only on the tokens on its
path (Hydra heads condition on them, Medusa heads ignore them), and the node is accepted exactly when every
node of its path matches the base model's argmax. So q(n), the probability that node n is accepted, is the
same in every tree that contains n, and a tree T emits 1 + sum of q(n) over its nodes per step in expectation.
``calibrate`` measures q on a large calibration tree with the model's heads on calibration prompts, builds
for every node budget and depth limit the best tree (the top-q nodes: a child never has a larger q than its
parent, so they always form a tree), times each candidate's real step on this device, and keeps the one with
the most expected tokens per second. Medusa's tree search assumes independent heads (q = a product of
per-head accuracies), which is wrong for Hydra heads; this one assumes nothing about the heads, and it prices
trees with this machine's step times, where a CPU and a GPU want very different trees.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from hydra_fast import generate as gen
from hydra_fast.engine import SamplingConfig
from hydra_fast.tree import Node, Tree

FORMAT = "hydra_fast.tree/1"
# Dynamic trees ``calibrate(dynamic=...)`` weighs when asked for the built-in set: budgets around the static trees'
DYNAMIC_BUDGETS = ("dynamic:nodes=15,depth=4,topk=4,width=2", "dynamic:nodes=31,depth=4,topk=8,width=4",
                   "dynamic:nodes=63,depth=4,topk=8,width=8", "dynamic:nodes=95,depth=4,topk=10,width=10")


def grown_tree(num_nodes: int, max_depth: int = 4, max_rank: int = 9) -> list[list[int]]:
    """A tree of ``num_nodes`` nodes (root included) grown greedily under a Medusa-like acceptance model.

    A node's score is the product over its path of a_depth * 0.7**rank with a = 0.6, 0.45, 0.35, 0.28, ...:
    at 64 nodes this gives mc_sim_7b_63's shape (10 / 28 / 24 / 1 nodes at depths 1-4). The calibration tree
    of ``calibrate`` and the tree sizes of the benchmarks are grown this way."""
    accept = (0.6, 0.45, 0.35, 0.28, 0.24, 0.2)

    def grow(prefix, score):
        for r in range(max_rank + 1):
            node = prefix + (r,)
            a = accept[min(len(prefix), len(accept) - 1)]  # this depth's acceptance
            s = score * a * 0.7 ** r
            yield s, node
            if len(node) < max_depth:
                yield from grow(node, s)

    nodes = sorted(grow((), 1.0), key=lambda x: (-x[0], len(x[1]), x[1]))[: max(0, num_nodes - 1)]
    return [list(n) for _, n in nodes]


@dataclass(frozen=True)
class Acceptance:
    """q(n) of every non-root node of a calibration tree, from ``steps`` speculative steps."""

    nodes: tuple[Node, ...]
    q: tuple[float, ...]
    steps: int

    def best_nodes(self, budget: int, max_depth: int) -> tuple[Node, ...]:
        """The ``budget`` non-root nodes of depth <= max_depth with the largest q (ties: shallower, lower ranks)."""
        order = sorted((i for i, n in enumerate(self.nodes) if len(n) <= max_depth),
                       key=lambda i: (-self.q[i], len(self.nodes[i]), self.nodes[i]))
        return tuple(sorted((self.nodes[i] for i in order[:budget]), key=lambda n: (len(n), n)))

    def expected_tokens(self, nodes) -> float:
        """Tokens emitted per step by a tree of these nodes: 1 + sum of q (nodes outside the calibration tree,
        unmeasured, count 0)."""
        q = dict(zip(self.nodes, self.q))
        return 1.0 + sum(q.get(tuple(n), 0.0) for n in nodes)


@dataclass
class TreeChoice:
    """The chosen tree, what it should give, and every candidate that was timed."""

    tree: list[list[int]] | str  # rank lists, or a dynamic tree's spec ("dynamic:nodes=..,depth=..,...")
    expected_tokens: float
    step_ms: float
    device: str
    candidates: list[dict] = field(default_factory=list)  # nodes, max_depth, expected_tokens, step_ms, tokens_per_s
    calibration: dict = field(default_factory=dict)
    context_draft: int = 0  # a context chain of this many tokens beside the heads' nodes (0: none)

    @property
    def tokens_per_s(self) -> float:
        return 1e3 * self.expected_tokens / self.step_ms

    def save(self, path) -> None:
        """Written beside ``path`` and renamed over it: an interrupted save leaves the old file whole."""
        from hydra_fast.safe_io import write_text_atomic

        write_text_atomic(path, json.dumps({"format": FORMAT, **asdict(self)}, indent=1))


def read_tree_file(path) -> tuple[list[list[int]] | str, int]:
    """(the tree, the context chain length it asks for) of a file written by ``TreeChoice.save`` (or a plain
    JSON list of rank lists, which asks for no chain), read and checked once. The tree is a list of rank lists,
    or a dynamic tree's spec string."""
    data = json.loads(Path(path).read_text())
    m = 0
    if isinstance(data, dict):
        if data.get("format") != FORMAT:
            raise ValueError(f"{path} is not a hydra_fast tree file (format {data.get('format')!r}, "
                             f"expected {FORMAT!r})")
        m = data.get("context_draft", 0)
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise ValueError(f"{path}: context_draft must be an int >= 0, got {m!r}")
        data = data["tree"]
    Tree.from_choices(data)  # validates
    return data, m


def load_tree(path) -> list[list[int]]:
    """The tree of a file written by ``TreeChoice.save`` (or a plain JSON list of rank lists)."""
    return read_tree_file(path)[0]


def _prefilled(model, ids: torch.Tensor, tree: Tree):
    # the root-only tree is timed as plain decoding (no heads run at all)
    engine, runner = model._get_engine(1, tree, SamplingConfig(), use_heads=tree.num_nodes > 1)
    prompts = gen.prepare_prompts(ids, None, model.base.get_input_embeddings().weight.shape[0])
    engine.prefill(prompts.ids.to(engine.device), prompts.lengths)
    return engine, runner, int(prompts.lengths[0])


@torch.no_grad()
def measure_acceptance(model, prompts: list[torch.Tensor], tree=None, max_new_tokens: int = 96,
                       eos_token_ids=()) -> Acceptance:
    """q(n) for every node of ``tree`` (default: a grown tree of 96 nodes, depth 5) over greedy steps on
    ``prompts`` (token ids [1, T] each, e.g. chat-templated calibration prompts; keep evaluation prompts out)."""
    t = Tree.from_choices(tree if tree is not None else grown_tree(96, max_depth=5))
    if not isinstance(t, Tree):
        raise ValueError("per-node acceptance is measured on a static tree (its nodes are the same every step): "
                         "pass rank lists or a preset as the calibration tree, and dynamic trees to calibrate(dynamic=)")
    counts = torch.zeros(t.num_nodes, dtype=torch.float64)
    steps = 0
    eos = set(eos_token_ids)
    for ids in prompts:
        engine, runner, length = _prefilled(model, ids, t)
        made = 1
        while made < max_new_tokens and length + made + t.num_nodes < model.max_cache_len:
            result = runner().cpu()  # [1, 1 + L]
            a = int(result[0, 0])
            counts[engine.accepted[0, 1: a + 1].cpu()] += 1
            steps += 1
            made += a + 1
            if eos & set(result[0, 1: a + 2].tolist()):
                break
    q = (counts / max(steps, 1))[1:].tolist()
    return Acceptance(t.nodes[1:], tuple(q), steps)


@torch.no_grad()
def measure_tau(model, prompts: list[torch.Tensor], tree, max_new_tokens: int = 96, eos_token_ids=()) -> float:
    """Tokens per step of greedy decoding with ``tree`` (any kind: static, dynamic, with a context chain) over
    ``prompts`` (token ids [1, T] each): all steps of all prompts, the last (possibly cut) step of each included."""
    steps = tokens = 0
    for ids in prompts:
        out = model.generate(ids, max_new_tokens=max_new_tokens, tree=tree, eos_token_id=list(eos_token_ids) or None,
                             return_dict_in_generate=True)
        steps += len(out.accept_lengths[0])
        tokens += sum(out.accept_lengths[0])
    return tokens / max(steps, 1)


@torch.no_grad()
def time_tree(model, tree, ids: torch.Tensor, steps: int = 20, warmup: int = 3) -> float:
    """Median wall milliseconds of one speculative step (replay + read-back) with ``tree`` on this device."""
    t = Tree.from_choices(tree)
    engine, runner, length = _prefilled(model, ids, t)
    room = (model.max_cache_len - length - t.num_nodes) // (t.max_depth + 1)
    if room < warmup + 1:
        raise ValueError(f"max_cache_len {model.max_cache_len} leaves no room to time a {t.num_nodes}-node tree "
                         f"after a {length}-token prompt: use a shorter prompt or a larger max_cache_len")
    times = []
    for i in range(min(warmup + steps, room)):
        t0 = time.perf_counter()
        runner().cpu()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


NODE_BUDGETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 63)


def node_budgets(context_draft: int = 0) -> tuple[int, ...]:
    """``NODE_BUDGETS`` plus the budgets whose step (root, nodes and a context chain of ``context_draft``) has
    exactly 8, 16, 32 or 64 rows: kernels' costs move in steps of such row counts (the fused linear GEMV takes up
    to 8 rows, tensor-core tiles hold 16 or 64), so a tree that just fits below one should be weighed."""
    fill = (rows - 1 - context_draft for rows in (8, 16, 32, 64))
    return tuple(sorted({b for b in (*NODE_BUDGETS, *fill) if 1 <= b <= NODE_BUDGETS[-1]}))


def calibrate(model, prompts: list[torch.Tensor], budgets=None, depths=(1, 2, 3, 4, 5), calibration_tree=None,
              max_new_tokens: int = 96, eos_token_ids=(), rounds: int = 2, progress=None, dynamic=(),
              context_draft: int = 0) -> TreeChoice:
    """Measure acceptance on ``prompts``, time the best tree of every (node budget, depth limit) on this
    device, and return the one with the most expected tokens per second. The root-only tree (plain decoding
    in the same engine) is a candidate too, so heads that do not pay for themselves here are not used.
    Candidates are timed in ``rounds`` interleaved passes and keep their fastest median, so a slow spell of
    the machine (a shared CPU, clocks) does not fall on one candidate alone.

    ``budgets``: node budgets (default ``node_budgets(context_draft)``). ``context_draft``: the context chain the
    tree will run with (recorded in the returned choice); every candidate but the root-only one is timed with its
    rows (the expected tokens are the heads' alone: what the chain adds depends on the text, not on the tree).
    ``dynamic``: dynamic tree specs to weigh beside the static trees. A dynamic tree's shape changes every step,
    so its tokens per step are measured by decoding the same prompts with it (``measure_tau``), not predicted."""
    if model.heads is None:
        raise ValueError("calibrate needs a HydraModel with draft heads")
    if isinstance(context_draft, bool) or not isinstance(context_draft, int) or context_draft < 0:
        raise ValueError(f"context_draft must be an int >= 0, got {context_draft!r}")
    budgets = node_budgets(context_draft) if budgets is None else budgets
    acc = measure_acceptance(model, prompts, calibration_tree, max_new_tokens, eos_token_ids)
    trees = list(dict.fromkeys([()] + [acc.best_nodes(b, d) for b in budgets for d in depths]))  # distinct, in order
    heads_depth = len(model.heads.heads)
    dyn = {t.spec: t for t in map(Tree.from_choices, dynamic) if t.heads_depth <= heads_depth}  # the heads' reach
    runnable = {nodes: [list(n) for n in nodes] for nodes in trees} | {spec: spec for spec in dyn}
    timed = {key: tree if not key or not context_draft else Tree.from_choices(tree, context_len=context_draft)
             for key, tree in runnable.items()}  # as the step will run: with the chain's rows
    ms_of = dict.fromkeys(runnable, float("inf"))
    for _ in range(rounds):  # static and dynamic candidates in the same interleaved passes
        for key, tree in timed.items():
            ms_of[key] = min(ms_of[key], time_tree(model, tree, prompts[0]))
    candidates = []
    for key, tree in runnable.items():
        ms = ms_of[key]
        if key in dyn:  # tokens per step of a dynamic tree: measured by decoding
            t = dyn[key]
            exp = measure_tau(model, prompts, key, max_new_tokens, eos_token_ids)
            shape = dict(nodes=t.nodes, max_depth=t.depth)
        else:
            exp = acc.expected_tokens(key)
            shape = dict(nodes=len(key), max_depth=max((len(n) for n in key), default=0))
        candidates.append(dict(shape, expected_tokens=round(exp, 4), step_ms=round(ms, 4),
                               tokens_per_s=round(1e3 * exp / ms, 2), tree=tree,
                               **({"dynamic": key} if key in dyn else {})))
        if progress:
            progress(candidates[-1])
    best = max(candidates, key=lambda c: c["tokens_per_s"])
    model._engine = model._runner = model._engine_key = None  # free the last candidate's cache
    return TreeChoice(tree=best["tree"], expected_tokens=best["expected_tokens"], step_ms=best["step_ms"],
                      device=str(model.device), candidates=[{k: v for k, v in c.items() if k != "tree"}
                                                            for c in candidates],
                      calibration=dict(steps=acc.steps, prompts=len(prompts), tree_nodes=len(acc.nodes) + 1,
                                       rounds=rounds, max_new_tokens=max_new_tokens),
                      context_draft=context_draft)

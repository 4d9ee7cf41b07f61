"""Tree calibration: measured node acceptance, the best tree per budget, timed candidates, tree files."""
from __future__ import annotations

import contextlib
import json

import pytest
import torch

from hydra_fast import tree_search
from hydra_fast.heads import DraftHeads
from hydra_fast.model import HydraModel, resolve_tree
from hydra_fast.tree import Tree
from hydra_fast.tree_search import Acceptance, TreeChoice, calibrate, grown_tree, load_tree, measure_acceptance
from oracle_heads import DynamicOracleHeads, OracleHeads, bind, true_sequences
from test_engine import V, perturbed_heads, tiny


def test_best_nodes_are_trees_ranked_by_measured_acceptance():
    nodes = tuple(tuple(n) for n in grown_tree(40, max_depth=4))
    g = torch.Generator().manual_seed(0)
    # q must not grow from parent to child, as measured q cannot: make it so from random factors
    factors = dict(zip(nodes, torch.rand(len(nodes), generator=g).tolist()))
    q = {}
    for n in sorted(nodes, key=len):
        q[n] = factors[n] * (q[n[:-1]] if len(n) > 1 else 1.0)
    acc = Acceptance(nodes, tuple(q[n] for n in nodes), steps=100)
    for budget in (1, 3, 8, 20, 39):
        for depth in (1, 2, 4):
            best = acc.best_nodes(budget, depth)
            Tree.from_choices([list(n) for n in best])  # every parent is in: raises otherwise
            assert all(len(n) <= depth for n in best)
            eligible = sorted((q[n] for n in nodes if len(n) <= depth), reverse=True)
            assert len(best) == min(budget, len(eligible))
            assert acc.expected_tokens(best) == pytest.approx(1 + sum(eligible[:budget]))
    assert acc.expected_tokens([[7, 7, 7]]) == 1.0  # an unmeasured node counts nothing


@contextlib.contextmanager
def oracle_model(wrong_after: int, oracle_class=OracleHeads):
    """A tiny Llama whose oracle heads are right on the rank-0 chain down to ``wrong_after``, wrong elsewhere."""
    base = tiny("llama")
    ids = torch.randint(0, V, (1, 9))
    oracle = oracle_class(DraftHeads.from_base(base, "hydra"), true_sequences(base, [ids], 120), wrong_after)
    with bind(oracle):
        yield HydraModel(base, oracle, max_cache_len=512, cuda_graph=False), ids


def test_measured_acceptance_follows_the_drafts_and_predicts_tau_exactly():
    # The oracle drafts the true continuation on the rank-0 path down to depth 2 and wrong tokens elsewhere,
    # so q is 1 on (0,) and (0, 0) and 0 elsewhere, and any tree's expected tokens per step is its measured tau.
    with oracle_model(wrong_after=2) as (model, ids):
        acc = measure_acceptance(model, [ids], "mc_sim_7b_63", max_new_tokens=100)
        q = dict(zip(acc.nodes, acc.q))
        assert acc.steps >= 30 and len(acc.nodes) == 63
        assert q[(0,)] == q[(0, 0)] == 1.0
        assert all(v == 0.0 for n, v in q.items() if n not in ((0,), (0, 0)))
        for tree in ([[0]], [[0], [1], [0, 0], [0, 0, 0]], "mc_sim_7b_63"):
            out = model.generate(ids, max_new_tokens=61, tree=tree, return_dict_in_generate=True)
            steps = out.accept_lengths[0]
            nodes = Tree.from_choices(tree).nodes[1:]
            assert sum(steps) / len(steps) == acc.expected_tokens(nodes), tree


def test_calibrate_keeps_the_fastest_candidate_and_writes_a_tree_file(tmp_path):
    with oracle_model(wrong_after=99) as (model, ids):
        choice = calibrate(model, [ids], budgets=(1, 2, 4), depths=(1, 4), calibration_tree="mc_sim_7b_63",
                           max_new_tokens=60)
    assert {c["nodes"] for c in choice.candidates} >= {0, 1, 2, 4}  # the root-only tree is a candidate
    best = max(choice.candidates, key=lambda c: c["tokens_per_s"])
    assert choice.step_ms == best["step_ms"] and choice.expected_tokens == best["expected_tokens"]
    deep = [c for c in choice.candidates if c["max_depth"] == 4 and c["nodes"] == 4]
    assert deep and deep[0]["expected_tokens"] > 4.0  # the oracle's rank-0 chain is always accepted
    path = tmp_path / "tree.json"
    choice.save(path)
    assert load_tree(path) == choice.tree
    assert json.loads(path.read_text())["candidates"] == choice.candidates


def test_calibrate_times_the_trees_with_their_context_chain(monkeypatch):
    # the chain's rows are part of the step that will run: every candidate but the root-only one is timed with them
    timed = []
    real = tree_search.time_tree

    def spy(model, tree, ids, **kw):
        timed.append(Tree.from_choices(tree))
        return real(model, tree, ids, **kw)

    monkeypatch.setattr(tree_search, "time_tree", spy)
    with oracle_model(wrong_after=99) as (model, ids):
        choice = calibrate(model, [ids], budgets=(1, 2), depths=(1, 2), calibration_tree="mc_sim_7b_63",
                           max_new_tokens=40, rounds=1, context_draft=3)
    assert {t.context_len for t in timed if t.num_nodes > 1} == {3}
    assert [t.num_nodes for t in timed if t.context_len == 0] == [1]  # the root-only tree: plain decoding
    assert len(choice.candidates) == len(timed) and choice.context_draft == 3
    with pytest.raises(ValueError, match="context_draft"):
        calibrate(model, [ids], context_draft=-1)


def test_node_budgets_fill_row_counts():
    # the budgets whose step has 8, 16, 32 or 64 rows (root + nodes + chain) join the default ones
    assert tree_search.node_budgets(0) == (1, 2, 3, 4, 6, 7, 8, 12, 15, 16, 24, 31, 32, 48, 63)
    assert tree_search.node_budgets(8) == (1, 2, 3, 4, 6, 7, 8, 12, 16, 23, 24, 32, 48, 55, 63)


def test_calibrate_weighs_dynamic_trees_by_their_measured_tau(tmp_path):
    # the dynamic oracle keeps the true chain in every dynamic tree: 2 drafts + 1 token a step at depth >= 2
    specs = ("dynamic:nodes=6,depth=2,topk=3,width=2", "dynamic:nodes=12,depth=4,topk=3,width=2")
    with oracle_model(wrong_after=2, oracle_class=DynamicOracleHeads) as (model, ids):
        choice = calibrate(model, [ids], budgets=(1, 2), depths=(1, 2), calibration_tree="mc_sim_7b_63",
                           max_new_tokens=60, dynamic=specs + ("dynamic:nodes=20,depth=5,topk=4,width=4",))
    dyn = {c["dynamic"]: c for c in choice.candidates if c.get("dynamic")}
    assert sorted(dyn) == sorted(Tree.from_choices(s).spec for s in specs)  # the 5-deep one is beyond the heads
    for c in dyn.values():  # every step accepts the 2 right drafts: 3 tokens a step
        assert c["expected_tokens"] == 3.0 and c["step_ms"] > 0
    heads_dir = tmp_path / "heads"
    perturbed_heads(tiny("llama"), "hydra").save_pretrained(heads_dir)
    TreeChoice(tree=specs[1], expected_tokens=3.0, step_ms=1.0, device="cpu",
               context_draft=2).save(heads_dir / "tree_cpu.json")
    assert Tree.from_choices(resolve_tree("auto", heads_dir, "cpu")) == Tree.from_choices(specs[1] + "+ctx2")
    model = HydraModel.from_pretrained(tiny("llama"), heads_dir)
    assert model.default_tree == Tree.from_choices(specs[1], context_len=2)


def test_auto_tree_uses_the_heads_tree_file_for_the_device(tmp_path):
    heads_dir = tmp_path / "heads"
    perturbed_heads(tiny("llama"), "hydra").save_pretrained(heads_dir)
    assert resolve_tree("auto", heads_dir, torch.device("cpu")) == "mc_sim_7b_63"
    TreeChoice(tree=[[0], [1], [0, 0]], expected_tokens=2.0, step_ms=1.0, device="cpu").save(heads_dir / "tree_cpu.json")
    assert resolve_tree("auto", heads_dir, torch.device("cpu")) == [[0], [1], [0, 0]]
    assert resolve_tree("auto", heads_dir, torch.device("cuda")) == "mc_sim_7b_63"
    model = HydraModel.from_pretrained(tiny("llama"), heads_dir)
    assert model.default_tree == Tree.from_choices([[0], [1], [0, 0]])
    assert resolve_tree(str(heads_dir / "tree_cpu.json"), None, torch.device("cpu")) == [[0], [1], [0, 0]]


def test_a_tree_file_can_ask_for_a_context_chain(tmp_path):
    heads_dir = tmp_path / "heads"
    perturbed_heads(tiny("llama"), "hydra").save_pretrained(heads_dir)
    TreeChoice(tree=[[0], [1]], expected_tokens=2.0, step_ms=1.0, device="cpu",
               context_draft=4).save(heads_dir / "tree_cpu.json")
    want = Tree.from_choices([[0], [1]], context_len=4)
    assert Tree.from_choices(resolve_tree("auto", heads_dir, torch.device("cpu"))) == want
    assert Tree.from_choices(resolve_tree(f"{heads_dir / 'tree_cpu.json'}+ctx2", None, "cpu")).context_len == 2
    model = HydraModel.from_pretrained(tiny("llama"), heads_dir)
    assert model.default_tree == want
    ids = torch.randint(0, 100, (1, 6))
    out = model.generate(ids, max_new_tokens=8, context_draft=0, return_dict_in_generate=True)  # turned off
    assert torch.equal(out.sequences, model.generate(ids, max_new_tokens=8))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "hydra_fast.tree/1", "tree": [[0]], "context_draft": -1}))
    with pytest.raises(ValueError, match="context_draft must be an int >= 0"):
        resolve_tree(bad, None, "cpu")


def test_bad_tree_files_and_models_without_heads_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "something else", "tree": [[0]]}))
    with pytest.raises(ValueError, match="not a hydra_fast tree file"):
        load_tree(bad)
    orphan = tmp_path / "orphan.json"
    orphan.write_text(json.dumps([[0, 0]]))
    with pytest.raises(ValueError, match="has no parent"):
        load_tree(orphan)
    with pytest.raises(ValueError, match="needs a HydraModel with draft heads"):
        calibrate(HydraModel(tiny("llama"), None), [torch.randint(0, V, (1, 5))])
    base = tiny("llama")
    with pytest.raises(ValueError, match="per-node acceptance is measured on a static tree"):
        measure_acceptance(HydraModel(base, perturbed_heads(base, "hydra")), [torch.randint(0, V, (1, 5))], "dynamic")


def test_a_root_only_tree_runs_without_the_heads(tmp_path):
    # a calibration that finds no tree worth its cost writes the root-only tree: the heads (Hydra++'s prefix
    # layer too) must not run at every step for nothing
    heads_dir = tmp_path / "heads"
    perturbed_heads(tiny("llama"), "hydra++").save_pretrained(heads_dir)
    TreeChoice(tree=[], expected_tokens=1.0, step_ms=1.0, device="cpu").save(heads_dir / "tree_cpu.json")
    base = tiny("llama")
    model = HydraModel.from_pretrained(base, heads_dir)
    ids = torch.randint(0, 100, (1, 6))
    out = model.generate(ids, max_new_tokens=8)
    assert model._engine.heads is None and model._engine.prefix_cache is None
    assert torch.equal(out, HydraModel(base, None).generate(ids, max_new_tokens=8))
    model.generate(ids, max_new_tokens=8, context_draft=2)  # a context chain alone: still no heads
    assert model._engine.heads is None and model._engine.bufs.context_len == 2

"""Dynamic draft trees (``hydra_fast.dynamic_tree``): the spec, the tree built on the device against a
brute-force construction, and decoding with them end to end (greedy output equal to HF greedy, exactly the
right drafts accepted, per-sequence trees in a padded batch)."""
from __future__ import annotations

import pytest
import torch

from hydra_fast import dynamic_tree, reference
from hydra_fast.dynamic_tree import DynamicTree
from hydra_fast.heads import DraftHeads
from hydra_fast.model import HydraModel
from hydra_fast.tree import Tree
from conftest import cuda_ready
from oracle_heads import DynamicOracleHeads, bind, padded_batch, true_sequences
from test_engine import FAMILIES, KINDS, V, hf_greedy, perturbed_heads, run_without_inductor_caches, tiny


# ------------------------------------------------------------------ the spec
def test_spec_strings_parse_and_round_trip():
    t = Tree.from_choices("dynamic")
    assert isinstance(t, DynamicTree) and (t.nodes, t.depth, t.topk, t.width, t.context_len) == (63, 4, 8, 8, 0)
    assert t.num_nodes == 64 and t.heads_depth == 4 and t.max_depth == 4
    t = Tree.from_choices("dynamic:nodes=20,topk=5,width=3+ctx6")
    assert (t.nodes, t.depth, t.topk, t.width, t.context_len) == (20, 4, 5, 3, 6)
    assert t.num_nodes == 27 and t.max_depth == 6
    assert Tree.from_choices(t.spec + "+ctx6") == t
    assert Tree.from_choices(t, context_len=0).context_len == 0


@pytest.mark.parametrize("spec, message", [
    ("dynamic:nodes=0", "nodes must be an int >= 1"),
    ("dynamic:width=9", "width \\(9\\) cannot exceed topk \\(8\\)"),
    ("dynamic:nodes=100,depth=2,topk=4,width=4", "draft only 20 candidates"),
    ("dynamic:size=3", "is not one of depth, nodes, topk, width"),
    ("dynamic:nodes=-3", "is not one of"),
    ("dynamic:nodes", "is not one of"),
])
def test_bad_specs_are_refused_with_what_to_do(spec, message):
    with pytest.raises(ValueError, match=message):
        Tree.from_choices(spec)


def test_a_tree_deeper_than_the_heads_is_refused_before_any_step():
    base = tiny("llama")
    heads = DraftHeads.from_base(base, "hydra", num_heads=2)
    model = HydraModel(base, heads, max_cache_len=64, tree="dynamic:depth=3,nodes=10")
    with pytest.raises(ValueError, match="3 deep but these heads draft 2 levels"):
        model.generate(torch.randint(0, V, (1, 5)), max_new_tokens=4)


@pytest.mark.parametrize("tree", [[[0], [299]], "dynamic:nodes=10,topk=300,width=2"], ids=["static", "dynamic"])
def test_a_tree_wider_than_the_vocabulary_is_refused_before_any_step(tree):
    base = tiny("llama")  # V = 211 tokens: no head has a 300th guess
    model = HydraModel(base, perturbed_heads(base, "hydra"), max_cache_len=64, tree=tree)
    with pytest.raises(ValueError, match="top 300 guesses of a head but the heads draft from 211 tokens"):
        model.generate(torch.randint(0, V, (1, 5)), max_new_tokens=4)


# ------------------------------------------------------------------ the tree against brute force
def brute_force(heads, hidden, root, tree: DynamicTree, embed, lm_head):
    """One sequence's dynamic tree with Python lists: {path of tokens (root excluded): score} of the kept nodes."""
    def children(i, path):  # head i's top-k after root + path
        head = heads.heads[i]
        tokens = torch.tensor([[root] + list(path)], dtype=torch.long)[:, :head.path_len]
        x = head(hidden.view(1, -1), tokens, embed, reference)
        logp, ids = heads.draft_scores(i, x, lm_head, tree.topk)
        return [(int(t), float(lp)) for t, lp in zip(ids[0], logp[0])]

    step = lambda lp: min(lp, -dynamic_tree.MIN_STEP)  # noqa: E731
    level = {(t,): step(lp) for t, lp in children(0, ())}
    found = dict(level)
    for d in range(2, tree.depth + 1):
        frontier = sorted(level, key=lambda p: -level[p])[: tree.width]
        level = {p + (t,): level[p] + step(lp) for p in frontier for t, lp in children(d - 1, p)}
        found.update(level)
    best = sorted(found, key=lambda p: -found[p])[: tree.nodes]
    return {p: found[p] for p in best}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("spec", ["dynamic:nodes=12,depth=3,topk=4,width=2", "dynamic:nodes=30,depth=4,topk=5,width=5"])
def test_tree_is_the_brute_force_selection_laid_out_as_a_tree(kind, spec):
    torch.manual_seed(3)
    base = tiny("llama")
    heads = perturbed_heads(base, kind, seed=4)
    tree = Tree.from_choices(spec + "+ctx2")
    bufs = tree.buffers("cpu")
    B, d = 3, base.config.hidden_size
    hidden = torch.randn(B, d)
    root = torch.randint(0, V, (B,))
    embed, lm_head = base.get_input_embeddings().weight, base.get_output_embeddings()
    with torch.no_grad():
        cand, st = dynamic_tree.draft(heads, hidden, root, bufs, embed, lm_head, reference)
        N, L, Nh = tree.num_nodes, tree.max_depth + 1, 1 + tree.nodes
        assert cand.shape == (B, N) and st.tree_mask.shape == (B, N, N) and st.paths.shape == (B, N, L)
        for b in range(B):
            want = brute_force(heads, hidden[b], int(root[b]), tree, embed, lm_head)
            paths = st.paths[b]
            got = {}
            for i in range(1, Nh):
                nodes = [int(n) for n in paths[i] if n >= 0]
                assert nodes[0] == 0 and nodes[-1] == i and all(a < c for a, c in zip(nodes, nodes[1:]))
                assert int(st.depth[b, i]) == len(nodes) - 1
                got[tuple(int(cand[b, n]) for n in nodes[1:])] = i
            assert set(got) == set(want)  # the same token paths: the brute force's top nodes, as a tree
            assert int(cand[b, 0]) == int(root[b])
            for i in range(N):  # the mask row is the node's ancestors and itself
                nodes = {int(n) for n in paths[i] if n >= 0}
                assert {int(j) for j in st.tree_mask[b, i].nonzero()} == nodes
            for k in range(tree.context_len):  # the context chain off the root
                assert [int(n) for n in paths[Nh + k] if n >= 0] == [0] + list(range(Nh, Nh + k + 1))
            parents = [-1] + [[int(n) for n in paths[i] if n >= 0][-2] for i in range(1, N)]
            for p in range(N):  # children lists: every child once, in index order
                kids, c = [], int(st.first_child[b, p])
                while c >= 0:
                    kids.append(c)
                    c = int(st.next_sibling[b, c])
                assert kids == [c for c in range(N) if parents[c] == p]


# ------------------------------------------------------------------ decoding
SPECS = ["dynamic:nodes=20,depth=3,topk=4,width=3", "dynamic:nodes=10,depth=4,topk=3,width=2+ctx3",
         "dynamic:nodes=3,depth=1,topk=4,width=1+ctx5"]


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("kind", KINDS)
def test_greedy_matches_hf(family, kind):
    base = tiny(family)
    ids = torch.randint(0, V, (1, 7))
    ref = hf_greedy(base, ids, 40)
    for spec in SPECS:
        model = HydraModel(base, perturbed_heads(base, kind), max_cache_len=160, tree=spec)
        assert torch.equal(model.generate(ids, max_new_tokens=40), ref), spec


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("use_kernels", [False, True], ids=["reference", "kernels"])
@pytest.mark.parametrize("wrong_after", [0, 2, 99])
def test_oracle_drafts_accept_exactly(kind, use_kernels, wrong_after):
    # the true chain scores highest, so the tree must keep it: every step accepts min(wrong_after, depth) drafts
    base = tiny("qwen3" if kind == "hydra++" else "llama")
    oracle_decode_matches_hf(base, kind, 37, wrong_after, "dynamic:nodes=24,depth=4,topk=4,width=3", 4,
                             use_kernels=use_kernels)


def oracle_decode_matches_hf(base, kind, n, wrong_after, spec, depth, **model_kw) -> None:
    """Decode a random prompt with dynamic-oracle heads: the output equals HF greedy and each step accepts exactly
    min(wrong_after, depth) drafts."""
    device = base.device
    ids = torch.randint(0, V, (1, 9)).to(device)
    oracle = DynamicOracleHeads(DraftHeads.from_base(base, kind), true_sequences(base, [ids], n), wrong_after)
    with bind(oracle.to(device)):
        model = HydraModel(base, oracle, max_cache_len=192, tree=spec, **model_kw)
        out = model.generate(ids, max_new_tokens=n, return_dict_in_generate=True)
    assert torch.equal(out.sequences, hf_greedy(base, ids, n))
    assert out.accept_lengths == oracle.expected_accept_lengths(n, depth)


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_rows_get_their_own_trees(side):
    # rows accept different numbers of drafts, so their trees (and cache lengths) differ every step
    base = tiny("mistral")
    prompts = [torch.randint(0, V, (1, n)) for n in (5, 11, 8)]
    n = 30
    oracle = DynamicOracleHeads(DraftHeads.from_base(base, "hydra"), true_sequences(base, prompts, n),
                                wrong_after=[0, 3, 1])
    ids, mask = padded_batch(prompts, side)
    with bind(oracle):
        model = HydraModel(base, oracle, max_cache_len=160, tree="dynamic:nodes=16,depth=3,topk=4,width=2")
        out = model.generate(ids, attention_mask=mask, max_new_tokens=n, return_dict_in_generate=True)
    for b, p in enumerate(prompts):
        want = hf_greedy(base, p, n)[0, p.shape[1]:]
        row = out.sequences[b, ids.shape[1]:]
        assert torch.equal(row[: want.shape[0]], want)
    for r, per_step in zip(out.accept_lengths, (1, 4, 2)):  # min(wrong_after, depth) + 1 tokens a step
        assert r[:-1] == [per_step] * (len(r) - 1) and 0 < r[-1] <= per_step


def _compiled_dynamic_step_equals_hf(device: str) -> None:
    # in its own process (inductor caches off): the dynamic tree's construction compiles with the step
    oracle_decode_matches_hf(tiny("llama").to(device), "hydra++", 25, 2, "dynamic:nodes=12,depth=3,topk=4,width=2", 3,
                             compile=True)


@pytest.mark.slow
def test_compiled_dynamic_step_matches_hf():
    run_without_inductor_caches("import test_dynamic_tree as t; t._compiled_dynamic_step_equals_hf('cpu')")


# ------------------------------------------------------------------ CUDA: the tree built inside the step's graph
needs_cuda = pytest.mark.skipif(not cuda_ready(), reason="needs a CUDA device and hydra_fast._C built with CUDA")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("spec", ["dynamic:nodes=24,depth=4,topk=4,width=3", "dynamic+ctx4"])
@pytest.mark.parametrize("wrong_after", [1, 99])
def test_cuda_graph_dynamic_tree_matches_hf_and_accepts_exactly(kind, spec, wrong_after, monkeypatch):
    from test_cuda_engine import GraphCounter

    base = tiny("llama").cuda()
    ids = torch.randint(0, V, (1, 9), device="cuda")
    n = 41
    oracle = DynamicOracleHeads(DraftHeads.from_base(base, kind), true_sequences(base, [ids], n), wrong_after).cuda()
    graphs = GraphCounter(monkeypatch)
    with bind(oracle):
        model = HydraModel(base, oracle, max_cache_len=192, tree=spec)
        out = model.generate(ids, max_new_tokens=n, return_dict_in_generate=True)
    assert torch.equal(out.sequences, hf_greedy(base, ids, n))
    steps = out.accept_lengths[0]
    if "ctx" not in spec:
        assert out.accept_lengths == oracle.expected_accept_lengths(n, 4)
    else:  # context drafts may add accepted tokens on a repetitive random model, never remove the heads' ones
        assert all(a >= min(wrong_after, 4) + 1 for a in steps[:-1])
    assert graphs.captures == 2 and graphs.replays == len(steps) + 1  # the step's graph and the prefill's


@pytest.mark.cuda
@needs_cuda
def test_cuda_compiled_dynamic_step_in_a_graph_matches_hf():
    run_without_inductor_caches("import test_dynamic_tree as t; t._compiled_dynamic_step_equals_hf('cuda')")

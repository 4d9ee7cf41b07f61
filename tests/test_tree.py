"""Draft trees: hand-built trees with exact buffers first, then properties of the presets."""
import pytest
import torch

from hydra_fast.tree import PRESETS, Tree, chain


def _t(rows):
    return torch.tensor(rows, dtype=torch.long)


def _check_level(level, depth, topk, parent_nodes, parent_paths, child_nodes, child_slot, child_rank):
    assert level.depth == depth and level.topk == topk
    assert torch.equal(level.parent_nodes, _t(parent_nodes))
    assert torch.equal(level.parent_paths, _t(parent_paths))
    assert torch.equal(level.child_nodes, _t(child_nodes))
    assert torch.equal(level.child_slot, _t(child_slot))
    assert torch.equal(level.child_rank, _t(child_rank))


def test_five_nodes_two_children_under_first():
    # given out of order: canonical order is root, (0,), (1,), (0, 0), (0, 1)
    tree = Tree.from_choices([[0, 1], [1], [0], (0, 0)])
    assert tree.nodes == ((), (0,), (1,), (0, 0), (0, 1))
    b = tree.buffers("cpu")
    assert (b.num_nodes, b.max_depth, b.num_paths) == (5, 2, 3)
    assert torch.equal(b.parents, _t([-1, 0, 0, 1, 1]))
    assert torch.equal(b.depth, _t([0, 1, 1, 2, 2]))
    assert torch.equal(b.ranks, _t([-1, 0, 1, 0, 1]))
    mask = torch.tensor([[1, 0, 0, 0, 0],
                         [1, 1, 0, 0, 0],
                         [1, 0, 1, 0, 0],
                         [1, 1, 0, 1, 0],
                         [1, 1, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(b.tree_mask, mask)
    assert torch.equal(b.paths, _t([[0, 2, -1], [0, 1, 3], [0, 1, 4]]))
    assert torch.equal(b.node_paths, _t([[0, -1, -1], [0, 1, -1], [0, 2, -1], [0, 1, 3], [0, 1, 4]]))
    assert len(b.levels) == 2
    _check_level(b.levels[0], 1, 2, [0], [[0]], [1, 2], [0, 0], [0, 1])
    _check_level(b.levels[1], 2, 2, [1], [[0, 1]], [3, 4], [0, 0], [0, 1])


def test_five_nodes_one_child_under_each():
    b = Tree.from_choices([[0], [1], [0, 0], [1, 0]]).buffers()
    assert torch.equal(b.parents, _t([-1, 0, 0, 1, 2]))
    assert torch.equal(b.ranks, _t([-1, 0, 1, 0, 0]))
    assert torch.equal(b.tree_mask[3], torch.tensor([1, 1, 0, 1, 0], dtype=torch.bool))
    assert torch.equal(b.tree_mask[4], torch.tensor([1, 0, 1, 0, 1], dtype=torch.bool))
    assert torch.equal(b.paths, _t([[0, 1, 3], [0, 2, 4]]))
    _check_level(b.levels[0], 1, 2, [0], [[0]], [1, 2], [0, 0], [0, 1])
    _check_level(b.levels[1], 2, 1, [1, 2], [[0, 1], [0, 2]], [3, 4], [0, 1], [0, 0])


def test_sibling_ranks_may_skip():
    b = Tree.from_choices([[0], [3]]).buffers()
    _check_level(b.levels[0], 1, 4, [0], [[0]], [1, 2], [0, 0], [0, 3])


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_invariants(name):
    tree = Tree.from_choices(name)
    b = tree.buffers()
    N, L = b.num_nodes, b.max_depth + 1
    assert b.paths.shape[1] == L and b.node_paths.shape == (N, L)
    parents = b.parents.tolist()
    assert parents[0] == -1 and all(0 <= parents[i] < i for i in range(1, N))
    for i in range(N):
        anc = tree.ancestors(i)
        assert anc[0] == 0 and anc[-1] == i and len(anc) == len(tree.nodes[i]) + 1
        expected = torch.zeros(N, dtype=torch.bool)
        expected[anc] = True
        assert torch.equal(b.tree_mask[i], expected)
        assert b.node_paths[i, : len(anc)].tolist() == anc and (b.node_paths[i, len(anc):] == -1).all()
    leaves = [i for i in range(N) if i not in set(parents)]
    assert b.paths[:, 0].eq(0).all()
    assert [p[p >= 0][-1].item() for p in b.paths] == leaves
    children = []
    for level in b.levels:
        d = level.depth
        kids = level.child_nodes.tolist()
        assert all(len(tree.nodes[c]) == d for c in kids)
        children += kids
        for c, s, r in zip(kids, level.child_slot.tolist(), level.child_rank.tolist()):
            p = level.parent_nodes[s].item()
            assert parents[c] == p and tree.nodes[c] == tree.nodes[p] + (r,)
            assert level.parent_paths[s].tolist() == tree.ancestors(p)
        assert level.topk == max(level.child_rank.tolist()) + 1
    assert children == list(range(1, N))


def test_mc_sim_7b_63():
    b = Tree.from_choices("mc_sim_7b_63").buffers()
    assert (b.num_nodes, b.max_depth) == (64, 4)
    assert [lv.topk for lv in b.levels] == [10, 10, 10, 2]
    assert [lv.child_nodes.numel() for lv in b.levels] == [10, 28, 23, 2]
    assert b.tree_mask.sum(-1).tolist() == (b.depth + 1).tolist()


def test_chain_and_plain():
    assert chain(3) == ((0,), (0, 0), (0, 0, 0))
    b = Tree.from_choices("chain4").buffers()
    assert torch.equal(b.paths, _t([[0, 1, 2, 3, 4]]))
    assert torch.equal(b.tree_mask, torch.ones(5, 5, dtype=torch.bool).tril())
    for plain in (Tree.plain(), Tree.from_choices([]), Tree.from_choices("plain"), Tree.from_choices(chain(0))):
        assert plain == Tree.plain()
        b = plain.buffers()
        assert (b.num_nodes, b.max_depth, b.levels) == (1, 0, ())
        assert torch.equal(b.paths, _t([[0]])) and torch.equal(b.node_paths, _t([[0]]))
        assert torch.equal(b.tree_mask, torch.ones(1, 1, dtype=torch.bool))
        assert torch.equal(b.parents, _t([-1])) and torch.equal(b.depth, _t([0]))


@pytest.mark.parametrize("choices, message", [
    ([[]], "is empty"),
    ([()], "is empty"),
    ([[0], [-1]], "rank -1 is negative"),
    ([[0.5]], "rank 0.5 is not an int"),
    ([[True]], "rank True is not an int"),
    ([[0], ["0"]], "is not an int"),
    ([[0], "0"], "must be a list of child ranks"),
    ([0], "must be a list of child ranks"),
    ([[0], [0, 0], [0, 0]], "[0, 0] appears more than once"),
    ([[0], (0,)], "[0] appears more than once"),
    ([[0], [1, 0]], "[1, 0] has no parent: add [1]"),
    ([[0, 0, 0], [0]], "[0, 0, 0] has no parent: add [0, 0]"),
    ("mc_sim_7b_64", "known presets: chain4, mc_sim_7b_63"),
    (7, "preset name or a list"),
])
def test_malformed_choices(choices, message):
    with pytest.raises(ValueError) as err:
        Tree.from_choices(choices)
    assert message in str(err.value)


def test_bad_chain_length():
    with pytest.raises(ValueError, match="non-negative int"):
        chain(-1)

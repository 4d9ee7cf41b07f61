"""Lossless sampling on the draft tree (``accept_sample``) and ``generate(do_sample=True)``.

Hand-built trees with exact expected outputs; kernel == reference on random inputs; the exact law of the tokens
one step emits, enumerated for toy trees and compared with the target's autoregressive law (to 1e-9); and
statistical tests of generate on a tiny model against the exact law of plain sampling from the same base (a
G-test whose false-alarm rate is stated below), which must also fail for typical acceptance and for a broken
residual update.
"""
from __future__ import annotations

import copy
import functools
import zlib

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import cuda_ready, generator, needs_extension, noncontiguous, random_tree, require_kernel
from hydra_fast import ops, reference, sampling
from hydra_fast.heads import DraftHeads
from hydra_fast.model import HydraModel
from hydra_fast.sampling import target_probs
from hydra_fast.tree import Tree, chain
from test_ops import check_accept_properties


def seed_of(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def links(parents: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """first_child / next_sibling [N] with each node's children in index order."""
    N = len(parents)
    first, nxt = [-1] * N, [-1] * N
    for c in range(N - 1, 0, -1):
        nxt[c], first[parents[c]] = first[parents[c]], c
    return torch.tensor(first), torch.tensor(nxt)


def impl_of(name: str, device):
    if name == "reference":
        return reference
    require_kernel("accept_sample", device)
    return ops


IMPLS = ["reference", pytest.param("kernel", marks=needs_extension)]


# ---------------------------------------------------------------------------------------------------------------
# hand-built trees


def run_case(impl, device, choices, rows, candidates, uniform):
    tree = Tree.from_choices(choices)
    bufs = tree.buffers(device)
    probs = torch.tensor(rows, dtype=torch.float32, device=device)  # [B, N, V]
    cand = torch.tensor(candidates, device=device)
    u = torch.tensor(uniform, dtype=torch.float32, device=device)
    out = impl.accept_sample(probs, cand, bufs.first_child, bufs.next_sibling, u, bufs.max_depth)
    return [t.tolist() for t in out]


@pytest.mark.parametrize("impl", IMPLS)
def test_chain(impl, device):
    impl = impl_of(impl, device)
    rows = [[0.125, 0.25, 0.375, 0.25], [0.5, 0.5, 0, 0], [0, 0, 0, 1]]
    cand = [[0, 3, 1], [0, 3, 1]]
    # sequence 0: u = .5 rejects token 3 (.25); the bonus comes from [.125, .25, .375, 0] / .75, u = .6 -> 2
    # sequence 1: u = .2 accepts 3, u = .4 accepts 1 (.5); leaf: the bonus from the one-hot row is 3
    uniform = [[0.6, 0.5, 0.9], [0.99, 0.2, 0.4]]
    accept_len, out, nodes = run_case(impl, device, chain(2), [rows, rows], cand, uniform)
    assert accept_len == [0, 2]
    assert out == [[2, -1, -1], [3, 1, 3]]
    assert nodes == [[0, -1, -1], [0, 1, 2]]


@pytest.mark.parametrize("impl", IMPLS)
def test_star_with_duplicate_siblings(impl, device):
    impl = impl_of(impl, device)
    star = [[0], [1], [2]]
    rows = [[0.25, 0.25, 0.5, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0]]
    # token 2 (.5) is rejected (u .6), its duplicate has residual 0 and is rejected even at u = 0, token 0 has
    # .25 of the remaining .5 and u = .4 accepts it; node 3 is a leaf, its row's bonus is 1
    got = run_case(impl, device, star, [rows], [[3, 2, 2, 0]], [[0.3, 0.6, 0.0, 0.4]])
    assert got == [[1], [[0, 1]], [[0, 3]]]
    # everything rejected: the bonus from [.25, .25, 0, 0] / .5 with u = .7 -> 1 (never the rejected 2)
    got = run_case(impl, device, star, [rows], [[3, 2, 2, 0]], [[0.7, 0.6, 0.0, 0.9]])
    assert got == [[0], [[1, -1]], [[0, -1]]]


@pytest.mark.parametrize("impl", IMPLS)
def test_one_hot_target(impl, device):
    impl = impl_of(impl, device)
    rows = [[0, 1, 0, 0], [0.25] * 4, [0, 0, 0, 1]]
    # token 0 has probability 0 (rejected at u = 0); token 1 has all of it (accepted at u = .999)
    got = run_case(impl, device, [[0], [1]], [rows], [[2, 0, 1]], [[0.5, 0.0, 0.999]])
    assert got == [[1], [[1, 3]], [[0, 2]]]


def test_iid_rule_with_p_equal_q():
    # children drawn from q = p: the first child is always accepted, min(1, p/q) = 1
    bufs = Tree.from_choices([[0], [1]]).buffers()
    rows = torch.tensor([[[0.1, 0.2, 0.3, 0.4], [0, 0, 1, 0], [0.25] * 4]])
    got = reference.accept_sample_iid(rows, rows, torch.tensor([[0, 0, 3]]), bufs.first_child, bufs.next_sibling,
                                      torch.tensor([[0.5, 0.999, 0.999]]), bufs.max_depth)
    assert [t.tolist() for t in got] == [[1], [[0, 2]], [[0, 1]]]


def test_tree_links_follow_rank_order():
    tree = Tree.from_choices("mc_sim_7b_63")
    bufs = tree.buffers()
    for n in range(tree.num_nodes):
        kids, c = [], int(bufs.first_child[n])
        while c >= 0:
            kids.append(c)
            c = int(bufs.next_sibling[c])
        assert kids == sorted((c for c in range(1, tree.num_nodes) if tree.parents[c] == n),
                              key=lambda c: tree.nodes[c][-1])
        assert [tree.nodes[c][-1] for c in kids] == list(range(len(kids)))


# ---------------------------------------------------------------------------------------------------------------
# kernel == reference on random inputs


def random_inputs(B, N, V, seed, device):
    gen = generator(seed)
    tree = random_tree(N, gen)
    first, nxt = links(tree.parents)
    logits = torch.randn(B, N, V, generator=gen) * 3
    logits[torch.rand(B, N, V, generator=gen) < 0.3] = float("-inf")  # filtered tokens: exact zeros
    logits[..., 0] = logits[..., 0].clamp(min=0)  # one token always survives
    probs = logits.softmax(-1)
    parents = torch.tensor(tree.parents).clamp(min=0)
    sampled = torch.multinomial(probs[:, parents].reshape(B * N, V), 1, generator=gen).view(B, N)
    dup = sampled.roll(1, dims=1)  # often a sibling's token
    pick = torch.rand(B, N, generator=gen)
    cand = torch.where(pick < 0.6, sampled, torch.where(pick < 0.8, dup, torch.randint(0, V, (B, N), generator=gen)))
    uniform = torch.rand(B, N, generator=gen)
    depth = int((tree.paths >= 0).sum(-1).max()) - 1
    to = dict(device=device)
    return tree, probs.to(**to), cand.to(**to), first.to(**to), nxt.to(**to), uniform.to(**to), depth


CASES = [(1, 1, 7), (2, 7, 83), (3, 64, 769), (2, 128, 4096 + 32)]


@needs_extension
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-N{}-V{}".format(*c))
def test_kernel_matches_reference(device, case):
    require_kernel("accept_sample", device)
    B, N, V = case
    tree, probs, cand, first, nxt, uniform, depth = random_inputs(B, N, V, seed_of("sample", case), device)
    if B > 1:
        probs, uniform = noncontiguous(probs, dim=0), noncontiguous(uniform, dim=0)
    got = ops.accept_sample(probs, cand, first, nxt, uniform, depth)
    want = reference.accept_sample(probs, cand, first, nxt, uniform, depth)
    for g, w in zip(got, want):
        assert g.dtype == torch.long and torch.equal(g, w)
    accept_len, out, nodes = got
    check_accept_properties(tree, cand, accept_len, out, nodes, V)
    rows = torch.arange(B, device=device)
    last = nodes.gather(1, accept_len.view(B, 1)).view(B)
    bonus = out.gather(1, accept_len.view(B, 1)).view(B)
    assert (probs[rows, last, bonus] > 0).all()  # the bonus token is never a filtered one


@needs_extension
def test_opcheck_and_compile(device):
    require_kernel("accept_sample", device)
    _, probs, cand, first, nxt, uniform, depth = random_inputs(2, 7, 19, seed_of("opcheck"), device)
    args = (probs, cand, first, nxt, uniform, depth)
    torch.library.opcheck(torch.ops.hydra_fast.accept_sample.default, args)
    compiled = torch.compile(ops.accept_sample, fullgraph=True, backend="aot_eager")
    for g, w in zip(compiled(*args), ops.accept_sample(*args)):
        assert torch.equal(g, w)


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_ready(), reason="needs a CUDA device and hydra_fast._C built with CUDA")
def test_cuda_graph():
    require_kernel("accept_sample", "cuda")
    static = list(random_inputs(2, 7, 19, seed_of("graph", 1), "cuda")[1:])
    ops.accept_sample(*static)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.accept_sample(*static)
    fresh = random_inputs(2, 7, 19, seed_of("graph", 2), "cuda")[1:]
    for dst, src in zip(static[:5], fresh[:5]):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    for g, w in zip(out, reference.accept_sample(*static)):
        assert torch.equal(g, w)


@needs_extension
@pytest.mark.parametrize("bad, match", [
    ("probs_dtype", "probs must be float32"),
    ("uniform_shape", r"uniform.size\(1\) must be N"),
    ("links_size", r"first_child.size\(0\) must be N"),
    ("depth", "max_depth must be in"),
    ("cand_dtype", "candidates must be Long"),
])
def test_bad_inputs(device, bad, match):
    require_kernel("accept_sample", device)
    _, probs, cand, first, nxt, uniform, depth = random_inputs(2, 7, 19, seed_of("bad"), device)
    if bad == "probs_dtype":
        probs = probs.half()
    elif bad == "uniform_shape":
        uniform = uniform[:, :3]
    elif bad == "links_size":
        first = first[:5]
    elif bad == "depth":
        depth = 7
    else:
        cand = cand.int()
    with pytest.raises(RuntimeError, match=match):
        ops.accept_sample(probs, cand, first, nxt, uniform, depth)


# ---------------------------------------------------------------------------------------------------------------
# the exact law of one step


def toy_row(prefix: tuple, V: int, seed: int) -> torch.Tensor:
    """A toy model's target distribution after ``prefix`` (float32 [V], some exact zeros)."""
    gen = generator(seed_of(seed, prefix))
    logits = torch.randn(V, generator=gen) * 1.5
    logits[torch.rand(V, generator=gen) < 0.25] = float("-inf")
    logits[int(torch.randint(0, V, (1,), generator=gen))] = 0.5  # never all filtered
    return logits.softmax(-1)


def step_outcomes(rows, cand, first, nxt, test, reject):
    """Every outcome of one step with its probability: (probability, emitted tokens, accepted nodes, uniform [N]),
    the uniforms chosen inside the outcome's box, found by walking the rule over all accept/reject branches."""
    N = len(cand)
    out = []

    def expand(node, prob, emitted, nodes, u):
        r = rows[node].double().clone()
        child = first[node]
        while child >= 0:
            tok = cand[child]
            thr = float(test(r, tok, node))
            if thr > 0:
                v = u.copy()
                v[child] = thr / 2
                expand(child, prob * thr, emitted + (tok,), nodes + (child,), v)
            if thr >= 1:
                return
            prob *= 1 - thr
            u[child] = (1 + thr) / 2
            r = reject(r, tok, node)
            child = nxt[child]
        total = float(r.sum())
        cdf = 0.0
        for x in range(r.numel()):
            if r[x] > 0:
                v = u.copy()
                v[0] = (2 * cdf + float(r[x])) / (2 * total)
                out.append((prob * float(r[x]) / total, emitted + (x,), nodes, v))
                cdf += float(r[x])

    expand(0, 1.0, (), (0,), [0.5] * N)
    return out


def point_mass_test(r, tok, node):
    return r[tok] / r.sum()


def point_mass_reject(r, tok, node):
    r = r.clone()
    r[tok] = 0
    return r


def check_law(outcomes, p_of, V, L):
    """The step's tokens followed by plain sampling have the target's autoregressive law, to 1e-9."""
    assert abs(sum(o[0] for o in outcomes) - 1) < 1e-12
    law: dict[tuple, float] = {}
    for prob, emitted, *_ in outcomes:
        law[emitted] = law.get(emitted, 0.0) + prob

    @functools.lru_cache(maxsize=None)
    def row_of(prefix):
        row = p_of(prefix).double()
        return (row / row.sum()).tolist()

    @functools.lru_cache(maxsize=None)
    def ar(s):  # plain sampling's probability of the sequence s
        return ar(s[:-1]) * row_of(s[:-1])[s[-1]] if s else 1.0

    seqs = [()]
    for k in range(1, L + 1):
        seqs = [s + (x,) for s in seqs for x in range(V) if ar(s) > 0]
        for s in seqs:
            combined = 0.0
            for e, prob in law.items():
                if len(e) >= k and e[:k] == s:
                    combined += prob
                elif len(e) < k and s[:len(e)] == e:
                    combined += prob * ar(s) / ar(e)
            assert abs(combined - ar(s)) < 1e-9, (s, combined, ar(s))


TOY_TREES = {
    "chain3": chain(3),
    "star4": [[0], [1], [2], [3]],
    "tiny": "tiny",
    "random9": None,
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("tree_name", sorted(TOY_TREES))
@pytest.mark.parametrize("V, drafts", [(4, "ranked"), (6, "duplicates"), (8, "ranked")])
def test_step_law_is_the_target_law(impl, tree_name, V, drafts):
    impl = impl_of(impl, "cpu")
    seed = seed_of(tree_name, V, drafts)
    if TOY_TREES[tree_name] is None:
        parents = random_tree(9, generator(seed), max_depth=3).parents
        first, nxt = links(parents)
    else:
        tree = Tree.from_choices(TOY_TREES[tree_name])
        parents, bufs = list(tree.parents), tree.buffers()
        first, nxt = bufs.first_child, bufs.next_sibling
    N = len(parents)
    path = [()]  # tokens after the root along each node's path
    cand = [0]
    for n in range(1, N):
        # children in the draft's rank order: a draft model's top tokens (deliberately not the target's), or with
        # every sibling drafting the same token
        siblings = [c for c in range(1, n) if parents[c] == parents[n]]
        draft = toy_row(path[parents[n]], V, seed + 1).argsort(descending=True).tolist()
        tok = draft[len(siblings) % V] if drafts == "ranked" else draft[0]
        cand.append(tok)
        path.append(path[parents[n]] + (tok,))

    def p_of(prefix):
        return toy_row(prefix, V, seed)

    rows = torch.stack([p_of(p) for p in path])  # [N, V]
    outcomes = step_outcomes(rows, cand, first.tolist(), nxt.tolist(), point_mass_test, point_mass_reject)
    depth = max(len(p) for p in path)
    check_law(outcomes, p_of, V, depth + 1)
    # the op emits each outcome's tokens for uniforms inside its box
    u = torch.tensor([o[3] for o in outcomes], dtype=torch.float32)  # [K, N]
    K = u.shape[0]
    accept_len, out, nodes = impl.accept_sample(rows.expand(K, N, V), torch.tensor(cand).expand(K, N), first, nxt,
                                                u, depth)
    for k, (_, emitted, accepted, _) in enumerate(outcomes):
        a = len(emitted) - 1
        assert int(accept_len[k]) == a
        assert out[k, :a + 1].tolist() == list(emitted) and nodes[k, :a + 1].tolist() == list(accepted)


def test_iid_rule_is_exact_for_iid_drafts():
    # A star whose 3 children are i.i.d. draws from q: averaged over the draws, the emitted token has law p.
    V, seed = 5, seed_of("iid")
    p = toy_row((), V, seed)
    q = toy_row((), V, seed + 1)
    q = (q + 0.05) / (q + 0.05).sum()  # q covers every token
    bufs = Tree.from_choices([[0], [1], [2]]).buffers()
    first, nxt = bufs.first_child.tolist(), bufs.next_sibling.tolist()
    rows = torch.stack([p] + [toy_row((t,), V, seed) for t in range(3)])  # the children's rows are unused
    qd = q.double() / q.double().sum()

    def test(r, tok, node):
        return min(1.0, float(r[tok] / r.sum() / qd[tok]))

    def reject(r, tok, node):
        return (r / r.sum() - qd).clamp(min=0)

    law = torch.zeros(V, dtype=torch.float64)
    for draw in torch.cartesian_prod(*[torch.arange(V)] * 3).tolist():
        weight = float(qd[draw].prod())
        cand = [0] + draw
        outcomes = step_outcomes(rows, cand, first, nxt, test, reject)
        u = torch.tensor([o[3] for o in outcomes], dtype=torch.float32)
        K = u.shape[0]
        _, out, _ = reference.accept_sample_iid(rows.expand(K, 4, V), q.expand(K, 4, V),
                                                torch.tensor(cand).expand(K, 4), bufs.first_child,
                                                bufs.next_sibling, u, 1)
        for k, (prob, emitted, _, _) in enumerate(outcomes):
            assert out[k, 0] == emitted[0]
            law[emitted[0]] += weight * prob
    torch.testing.assert_close(law, p.double() / p.double().sum(), atol=1e-9, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# generate against plain sampling of the same base model

VOCAB = 16
PROMPT = [3, 1, 4, 1, 5]
NEW = 3  # the law of the first NEW generated tokens is compared
ALPHA = 1e-4  # per-case false-alarm rate of the G-test (8 passing cases: at most 1e-3 for the whole set)
SAMPLES = 1024


@pytest.fixture(scope="module")
def tiny_lm():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=128)
    base = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        base.lm_head.weight.mul_(12.0)  # a peaked next-token law, like a real LM's
    return base, DraftHeads.from_base(base, "hydra")


def plain_law(base, T, top_k, top_p) -> dict[tuple, float]:
    """The exact law of the first NEW tokens of plain autoregressive sampling from base (prompt PROMPT)."""
    law = {(): 1.0}
    for _ in range(NEW):
        prefixes = list(law)
        with torch.no_grad():
            logits = base(torch.tensor([PROMPT + list(s) for s in prefixes])).logits[:, -1].float()
        probs = target_probs(logits, T, top_k, top_p).double()
        law = {s + (x,): law[s] * float(probs[i, x]) for i, s in enumerate(prefixes)
               for x in probs[i].nonzero().flatten().tolist()}
    return law


def g_test_pvalue(counts: dict[tuple, int], law: dict[tuple, float], n: int) -> float:
    """p-value of the G-test of the sampled counts against law. Sequences are pooled, most likely first, into
    bins of at least 5 expected samples (the partition depends on the law only); a sampled sequence that the
    law never produces fails outright."""
    if any(s not in law for s in counts):
        return 0.0
    obs, exp = [0.0], [0.0]
    for s in sorted(law, key=law.get, reverse=True):
        if exp[-1] >= 5:
            obs.append(0.0), exp.append(0.0)
        obs[-1] += counts.get(s, 0)
        exp[-1] += law[s] * n
    if len(exp) > 1 and exp[-1] < 5:  # the tail joins the bin before it
        obs[-2] += obs.pop()
        exp[-2] += exp.pop()
    obs_t, exp_t = torch.tensor(obs, dtype=torch.float64), torch.tensor(exp, dtype=torch.float64)
    g = 2 * float((obs_t * (obs_t / exp_t).log()).nan_to_num(0.0).sum())
    dof = obs_t.numel() - 1
    assert dof >= 10, "too few bins for a meaningful test"
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(g / 2, dtype=torch.float64)))


def sample_counts(model, device, n, tree, **kw) -> tuple[dict[tuple, int], float]:
    """Counts of the first NEW tokens over n sampled sequences, and the mean tokens emitted per step."""
    B = model.max_batch_size
    counts: dict[tuple, int] = {}
    steps, emitted = 0, 0
    gen = torch.Generator().manual_seed(seed_of(tree, sorted(kw.items())))
    ids = torch.tensor([PROMPT], device=device).expand(B, -1)
    for _ in range(n // B):
        out = model.generate(ids, max_new_tokens=NEW, do_sample=True, tree=tree, generator=gen, eos_token_id=[],
                             return_dict_in_generate=True, **kw)  # no EOS: every row has NEW sampled tokens
        for row in out.sequences[:, len(PROMPT):].tolist():
            counts[tuple(row)] = counts.get(tuple(row), 0) + 1
        for lens in out.accept_lengths:
            steps, emitted = steps + len(lens), emitted + sum(lens)
    return counts, emitted / max(steps, 1)


STAR6 = [[0], [1], [2], [3], [4], [5], [0, 0], [1, 0]]
STAT_CASES = [
    # tree, temperature, top_k, top_p
    pytest.param(("mc_sim_7b_63", 1.0, 0, 1.0), marks=pytest.mark.slow),
    pytest.param(("tiny", 0.7, 0, 0.9), marks=pytest.mark.slow),
    pytest.param(("chain4", 1.3, 5, 1.0), marks=pytest.mark.slow),
    (STAR6, 0.7, 0, 1.0),
    ("dynamic:nodes=8,depth=2,topk=4,width=2", 0.8, 0, 0.95),  # a tree the heads reshape every step
]


def stat_model(tiny_lm, device, use_kernels=True):
    base, heads = tiny_lm
    if torch.device(device).type == "cuda":
        base, heads = copy.deepcopy(base).to(device), copy.deepcopy(heads).to(device)
    return HydraModel(base, heads, max_cache_len=96, use_kernels=use_kernels, max_batch_size=64)


@pytest.mark.parametrize("case", STAT_CASES, ids=["mc_sim-T1", "tiny-T0.7-p0.9", "chain4-T1.3-k5", "star6-T0.7",
                                        "dynamic-T0.8-p0.95"])
def test_generate_samples_the_base_law(tiny_lm, device, case):
    tree, T, top_k, top_p = case
    model = stat_model(tiny_lm, device, use_kernels=ops.has_kernels(device))
    counts, tau = sample_counts(model, device, SAMPLES, tree, temperature=T, top_k=top_k, top_p=top_p)
    assert tau > 1.03, "drafts were rarely accepted: the case would not test acceptance"
    law = plain_law(tiny_lm[0], T, top_k, top_p)
    assert g_test_pvalue(counts, law, SAMPLES) > ALPHA


def broken_reject(residual, token, p_token, rejected, node):
    return residual  # forgets to remove a rejected token: its mass is sampled again as the bonus


@pytest.mark.parametrize("variant", ["typical", "broken_residual"])
def test_statistical_test_catches_lossy_acceptance(tiny_lm, monkeypatch, variant):
    # the star6 case of test_generate_samples_the_base_law, with a lossy acceptance: the same G-test rejects it
    kw = dict(temperature=0.7)
    if variant == "typical":
        model = stat_model(tiny_lm, "cpu", use_kernels=ops.has_kernels("cpu"))
        kw["acceptance"] = "typical"
    else:
        model = stat_model(tiny_lm, "cpu", use_kernels=False)
        monkeypatch.setattr(reference, "_reject_point_mass", broken_reject)
    counts, _ = sample_counts(model, "cpu", SAMPLES, STAR6, **kw)
    assert g_test_pvalue(counts, plain_law(tiny_lm[0], 0.7, 0, 1.0), SAMPLES) < ALPHA


# ---------------------------------------------------------------------------------------------------------------
# seeds and the engine


def test_generator_makes_runs_reproducible(tiny_lm, device):
    model = stat_model(tiny_lm, device, use_kernels=ops.has_kernels(device))
    ids = torch.tensor([PROMPT], device=device).expand(4, -1)

    def run(seed):
        return model.generate(ids, max_new_tokens=12, do_sample=True, tree="tiny",
                              generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))
    torch.manual_seed(5)
    a = model.generate(ids, max_new_tokens=12, do_sample=True, tree="tiny")
    torch.manual_seed(5)
    assert torch.equal(a, model.generate(ids, max_new_tokens=12, do_sample=True, tree="tiny"))


def test_sampling_arguments_are_checked(tiny_lm):
    model = stat_model(tiny_lm, "cpu")
    ids = torch.tensor([PROMPT])
    with pytest.raises(ValueError, match="acceptance must be one of exact, typical"):
        model.generate(ids, max_new_tokens=4, do_sample=True, acceptance="lossy")
    with pytest.raises(ValueError, match="top_k must be"):
        model.generate(ids, max_new_tokens=4, do_sample=True, top_k=-1)


def test_target_probs_top_k_then_top_p():
    logits = torch.log(torch.tensor([[0.4, 0.1, 0.2, 0.2, 0.1]]))
    # top-2 keeps 0.4 and both 0.2 (ties with the 2nd largest are kept, as HF): [.5, 0, .25, .25, 0]
    torch.testing.assert_close(target_probs(logits, 1.0, top_k=2), torch.tensor([[0.5, 0, 0.25, 0.25, 0]]))
    # top-3 of [.4, .1, .25, .15, .1] is [.5, .3125, .1875] (renormalised); its 0.6 nucleus keeps the first two
    untied = torch.log(torch.tensor([[0.4, 0.1, 0.25, 0.15, 0.1]]))
    torch.testing.assert_close(target_probs(untied, 1.0, top_k=3, top_p=0.6),
                               torch.tensor([[0.4 / 0.65, 0, 0.25 / 0.65, 0, 0]]))
    # temperature before the filters: T = 0.5 squares the probabilities
    torch.testing.assert_close(target_probs(logits, 0.5, top_k=1), torch.tensor([[1.0, 0, 0, 0, 0]]))
    sq = torch.tensor([0.16, 0.01, 0.04, 0.04, 0.01])
    torch.testing.assert_close(target_probs(logits, 0.5)[0], sq / sq.sum())


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_ready(), reason="needs a CUDA device and hydra_fast._C built with CUDA")
@pytest.mark.parametrize("compile", [False, True], ids=["graph", "compile+graph"])
def test_cuda_step_graph_samples_the_base_law(tiny_lm, compile):
    # the step replayed as a CUDA graph (optionally compiled) draws from the engine's registered generator:
    # reproducible for a seed, and the star6 case's law holds
    base, heads = (copy.deepcopy(m).cuda() for m in tiny_lm)
    model = HydraModel(base, heads, max_cache_len=96, max_batch_size=64, compile=compile)
    ids = torch.tensor([PROMPT], device="cuda").expand(8, -1)
    a, b = (model.generate(ids, max_new_tokens=12, do_sample=True, tree=STAR6,
                           generator=torch.Generator().manual_seed(3)) for _ in range(2))
    assert torch.equal(a, b)
    counts, _ = sample_counts(model, "cuda", SAMPLES, STAR6, temperature=0.7)
    assert g_test_pvalue(counts, plain_law(tiny_lm[0], 0.7, 0, 1.0), SAMPLES) > ALPHA


# ---------------------------------------------------------------------------------------------------------------
# the target distribution's nucleus: the CPU's partial sort against the full sort (the path of CUDA graphs)


def sort_target(logits, T, top_k, top_p, monkeypatch) -> torch.Tensor:
    """target_probs with the nucleus found by a full sort of every row."""
    with monkeypatch.context() as m:
        m.setattr(sampling, "_partial_sort", lambda t: False)
        return target_probs(logits, T, top_k, top_p)


def check_nucleus(logits, T, top_k, top_p, monkeypatch) -> torch.Tensor:
    """The CPU target equals the full-sort one bit for bit, is softmax(filter_logits / T), and keeps the nucleus
    of the definition: the tokens above the least kept one hold less than top_p, with it at least top_p."""
    probs = target_probs(logits, T, top_k, top_p)
    assert probs.dtype == torch.float32 and probs.shape == logits.shape
    assert torch.equal(probs, sort_target(logits, T, top_k, top_p, monkeypatch))
    assert torch.equal(probs, torch.softmax(sampling.filter_logits(logits, T, top_k, top_p) / T, dim=-1))
    scaled = logits.float() / T
    if 0 < top_k < logits.shape[-1]:
        scaled = scaled.masked_fill(scaled < scaled.topk(top_k, -1).values[..., -1:], -float("inf"))
    before = scaled.softmax(-1).double()  # the distribution the nucleus is cut from
    floor = before.masked_fill(probs == 0, 2.0).amin(-1, keepdim=True)  # the least kept probability
    assert torch.equal(probs > 0, before >= floor)  # every tie of the least kept token is kept
    above, kept = (before * (before > floor)).sum(-1), (before * (before >= floor)).sum(-1)
    assert bool((above < top_p + 1e-6).all()) and bool((kept >= min(top_p, 1.0) - 1e-6).all())
    return probs


def draw_logits(kind: str, shape, seed: int) -> torch.Tensor:
    g = generator(seed)
    if kind == "ties":  # few distinct values: large groups of equal probabilities at every cut
        return torch.randint(0, 4, shape, generator=g).float()
    return torch.randn(shape, generator=g) * {"peaked": 4.0, "flat": 0.3}[kind]


@pytest.mark.parametrize("kind", ["peaked", "flat", "ties"])
@pytest.mark.parametrize("top_k, top_p", [(0, 0.9), (0, 1e-6), (0, 0.999999), (0, 0.5), (50, 0.9), (3, 0.6),
                                          (20, 1.0)])
@pytest.mark.parametrize("T", [1.0, 0.6, 1.7])
def test_cpu_nucleus_equals_full_sort(kind, top_k, top_p, T, monkeypatch):
    check_nucleus(draw_logits(kind, (2, 3, 769), seed_of(kind, top_k, top_p, T)), T, top_k, top_p, monkeypatch)


@pytest.mark.parametrize("V", [1, 7, 83, 256, 4096 + 32])
def test_cpu_nucleus_sizes(V, monkeypatch):
    logits = draw_logits("peaked", (5, V), seed_of(V))  # [B, V], as prefill's first token
    probs = check_nucleus(logits, 0.8, 0, 0.95, monkeypatch)
    assert bool((probs > 0).any(-1).all())


def test_cpu_nucleus_rows_that_need_more_tokens(monkeypatch):
    # peaked rows end inside the first partial sort; flat ones need the next (4096) or the whole row sorted
    V = 49152
    logits = torch.cat([draw_logits("peaked", (1, 3, V), 1) * 1.5, draw_logits("flat", (1, 2, V), 2),
                        draw_logits("flat", (1, 1, V), 3) * 10], dim=1)  # [1, 6, V]: std 6, 0.3, 3
    sizes = (check_nucleus(logits, 1.0, 0, 0.9, monkeypatch) > 0).sum(-1).flatten()
    first = sampling._FIRST_K
    assert sizes[:3].max() < first < sizes[5] < first * sampling._GROWTH < sizes[3:5].min(), sizes
    # and with top-p near 1 every row's nucleus is nearly the whole vocabulary
    check_nucleus(logits[:, 3:5], 1.0, 0, 0.99999, monkeypatch)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_nucleus_of_half_logits(dtype, monkeypatch):
    logits = draw_logits("peaked", (2, 4, 1000), seed_of(str(dtype))).to(dtype)  # low precision: many ties
    probs = check_nucleus(logits, 0.7, 40, 0.8, monkeypatch)
    assert torch.equal(probs, target_probs(logits.float(), 0.7, 40, 0.8))


def test_nucleus_keeps_every_tie_of_its_least_token():
    def kept(p, top_p):
        return (target_probs(torch.tensor([p]).log(), 1.0, 0, top_p) > 0)[0].tolist()

    assert kept([0.4, 0.2, 0.2, 0.2], 0.35) == [True, False, False, False]
    assert kept([0.4, 0.2, 0.2, 0.2], 0.5) == [True, True, True, True]  # 0.4 + 0.2 reaches 0.5: all 0.2s join
    assert kept([0.1, 0.3, 0.2, 0.3, 0.1], 0.5) == [False, True, False, True, False]
    assert kept([0.1, 0.3, 0.2, 0.3, 0.1], 0.7) == [False, True, True, True, False]
    assert kept([0.1, 0.3, 0.2, 0.3, 0.1], 0.85) == [True, True, True, True, True]


def test_top_p_next_to_one_keeps_the_top_k_filter(monkeypatch):
    # top_p rounds to 1 in float32: the nucleus is every token, including those top-k gave probability 0
    logits = draw_logits("peaked", (64, 500), 5)  # many rows: some top-5 masses round below 1
    probs = check_nucleus(logits, 0.9, 5, 1 - 1e-9, monkeypatch)
    assert torch.equal(probs, target_probs(logits, 0.9, 5)) and bool(((probs > 0).sum(-1) == 5).all())


def test_nucleus_under_torch_compile():
    # torch.compile takes the full-sort nucleus (no host reads, no graph break) and gets the same distribution
    logits = draw_logits("peaked", (1, 8, 500), 7)
    compiled = torch.compile(target_probs, fullgraph=True, backend="eager")
    assert torch.equal(compiled(logits, 0.7, 50, 0.9), target_probs(logits, 0.7, 50, 0.9))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_target_probs_in_a_graph():
    # the CUDA path (full sort) is captured in a CUDA graph and replays the eager result; it keeps the CPU's
    # nucleus on peaked logits (cumulative sums on the two devices may differ in the last bit: no cut at a tie)
    logits = draw_logits("peaked", (1, 64, 49152), 11).cuda()
    eager = target_probs(logits, 0.7, 50, 0.9)
    out = torch.empty_like(eager)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out.copy_(target_probs(logits, 0.7, 50, 0.9))  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(target_probs(logits, 0.7, 50, 0.9))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    cpu = target_probs(logits.cpu(), 0.7, 50, 0.9)
    assert torch.equal(eager.cpu() > 0, cpu > 0)
    torch.testing.assert_close(eager.cpu(), cpu, rtol=1e-5, atol=1e-7)

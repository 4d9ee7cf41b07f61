"""Context drafts (``hydra_fast.context``): the matching rule against a plain-Python spec, the context chain of
a tree, and the engine with context nodes (greedy output equal to HF greedy; drafts from the text accepted,
step by step as the spec predicts)."""
from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, generator
from test_cli import common, folders, hf_answer  # noqa: F401 (folders: the CLI's tiny model folders)
from test_engine import V, hf_greedy, perturbed_heads, tiny

from hydra_fast import context
from hydra_fast.model import HydraModel
from hydra_fast.tree import Tree


def spec_draft(tokens: list[int], num_tokens: int, max_ngram: int = context.MAX_NGRAM) -> list[int]:
    """The rule in words: the earlier occurrence (ending before the last token) of the longest suffix of at most
    max_ngram tokens, the latest on ties; then copy what followed it, token by token, the copy reading its own
    output once it reaches the end of the text."""
    n = len(tokens)
    best_len, best_end = -1, 0
    for e in range(n - 1):
        k = 0
        while k < max_ngram and e - k >= 0 and tokens[e - k] == tokens[n - 1 - k]:
            k += 1
        if k >= best_len:
            best_len, best_end = k, e
    text = list(tokens)
    for j in range(num_tokens):
        text.append(text[best_end + 1 + j] if n >= 2 else tokens[-1])
    return text[n:]


def no_eos(base):
    base.generation_config.eos_token_id = None  # random models: run to max_new_tokens in HF and here alike
    return base


# ---------------------------------------------------------------------------------------------------- matching
def test_hand_built_matches():
    h = torch.tensor([[5, 6, 7, 8, 9, 1, 2, 5, 6, 0, 0, 0],  # "5 6" seen at 0..1: continue with 7 8 9 ...
                      [1, 2, 3, 1, 2, 3, 1, 2, 0, 0, 0, 0],  # a period-3 pattern, continued past the text
                      [4, 9, 4, 8, 3, 4, 0, 0, 0, 0, 0, 0],  # "4" twice before: the latest wins (after it: 8)
                      [1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0]])  # no match: the root repeated
    valid = torch.tensor([9, 8, 6, 8])
    end, length = context.match(h, valid)
    assert end.tolist() == [1, 4, 2, 6] and length.tolist() == [2, 4, 1, 0]
    assert context.draft(h, valid, 5).tolist() == [[7, 8, 9, 1, 2], [3, 1, 2, 3, 1], [8, 3, 4, 8, 3],
                                                   [8, 8, 8, 8, 8]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("vocab,max_ngram,M", [(3, 4, 7), (5, 2, 3), (11, 4, 1), (40, 3, 10)])
def test_draft_matches_the_spec(device, vocab, max_ngram, M):
    g = generator(vocab * 100 + M)
    B, W = 6, 57
    history = torch.randint(0, vocab, (B, W), generator=g)
    valid = torch.randint(1, W + 1, (B,), generator=g)
    valid[0], valid[1] = 1, 2  # the shortest texts: only a root; one token before the root
    got = context.draft(history.to(device), valid.to(device), M, max_ngram).cpu()
    for b in range(B):
        assert got[b].tolist() == spec_draft(history[b, : valid[b]].tolist(), M, max_ngram), f"row {b}"


def test_history_follows_prefill_and_commits():
    h = torch.full((2, 12), 7, dtype=torch.long)
    context.write_prompt(h, torch.tensor([[3, 4, 5], [6, 0, 0]]), torch.tensor([3, 1]), torch.tensor([9, 8]))
    assert h[0, :4].tolist() == [3, 4, 5, 9] and h[1, :2].tolist() == [6, 8]
    lens = torch.tensor([3, 1], dtype=torch.int32)  # the roots (9, 8) sit at the cache lengths
    context.advance(h, lens, torch.tensor([[1, 2, -1], [5, -1, -1]]))  # 1 draft + root; 0 drafts + root
    assert h[0, :6].tolist() == [3, 4, 5, 9, 1, 2] and h[1, :3].tolist() == [6, 8, 5]
    assert int(h.min()) >= 0  # padding is never written as -1 (it would be read as a token id)


# ---------------------------------------------------------------------------------------------------- the tree
def test_context_chain_of_a_tree():
    heads_only = Tree.from_choices("tiny")
    t = Tree.from_choices("tiny+ctx3")
    assert t == Tree.from_choices("tiny", context_len=3) == heads_only.with_context(3)
    assert t.nodes == heads_only.nodes and t.num_nodes == 10 and t.max_depth == 3 and t.heads_depth == 3
    b, hb = t.buffers(), heads_only.buffers()
    assert b.parents.tolist() == hb.parents.tolist() + [0, 7, 8]
    assert b.depth.tolist()[7:] == [1, 2, 3] and b.context_len == 3
    assert b.paths[-1].tolist() == [0, 7, 8, 9]
    assert torch.equal(b.tree_mask[:7, :7], hb.tree_mask) and not b.tree_mask[7:, 1:7].any()
    assert [lv.child_nodes.tolist() for lv in b.levels] == [lv.child_nodes.tolist() for lv in hb.levels]
    deep = Tree.from_choices("plain+ctx5").buffers()
    assert deep.num_nodes == 6 and deep.paths.tolist() == [[0, 1, 2, 3, 4, 5]] and deep.levels == ()


def test_bad_context_lengths_are_clear_errors():
    with pytest.raises(ValueError, match="non-negative int"):
        Tree.plain().with_context(-1)
    with pytest.raises(ValueError, match=r"unknown tree preset .*\+ctx8"):
        Tree.from_choices("tiny+ctxfour")
    base = tiny("llama")
    with pytest.raises(ValueError, match="non-negative int"):
        HydraModel(base, None, max_cache_len=64).generate(torch.tensor([[1, 2]]), max_new_tokens=2,
                                                          context_draft=1.5)


# ---------------------------------------------------------------------------------------------------- the engine
def simulate_plain(full: list[int], prompt_len: int, new: int, M: int) -> list[int]:
    """Tokens each step emits when only a context chain of M nodes drafts, from the greedy text ``full``."""
    pos, steps = prompt_len + 1, []  # the prefill emits the first token
    while pos < prompt_len + new:
        chain = spec_draft(full[:pos], M)
        a = 0
        while a < M and chain[a] == full[pos + a]:
            a += 1
        steps.append(a + 1)
        pos += a + 1
    return steps


def test_context_only_decoding_is_exact_and_accepts_as_the_spec_says():
    base = no_eos(tiny("llama"))
    P, new, M = 8, 64, 6
    ids = torch.randint(0, V, (1, P), generator=generator(5))
    ref = hf_greedy(base, ids, new + M + 1)  # room for the last step's look-ahead
    model = HydraModel(base, None, tree="plain+ctx6", max_cache_len=256)
    out = model.generate(ids, max_new_tokens=new, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref[:, : P + new])
    steps = out.accept_lengths[0]
    assert steps == simulate_plain(ref[0].tolist(), P, new, M)
    assert max(steps) > 1  # the random model repeats itself and the context chain catches it
    plain = model.generate(ids, max_new_tokens=new, context_draft=0, return_dict_in_generate=True)
    assert torch.equal(plain.sequences, out.sequences) and len(plain.accept_lengths[0]) > len(steps)


def test_heads_with_context_are_exact_and_accept_more():
    base = no_eos(tiny("qwen3"))
    P, new = 8, 64
    ids = torch.randint(0, V, (1, P), generator=generator(7))
    ref = hf_greedy(base, ids, new)
    model = HydraModel(base, perturbed_heads(base, "hydra++"), tree="tiny", max_cache_len=256)
    both = model.generate(ids, max_new_tokens=new, context_draft=8, return_dict_in_generate=True)
    heads = model.generate(ids, max_new_tokens=new, return_dict_in_generate=True)
    assert torch.equal(both.sequences, ref) and torch.equal(heads.sequences, ref)
    assert max(both.accept_lengths[0]) > 4  # deeper than the 3-deep heads' tree: the context chain won
    assert len(both.accept_lengths[0]) < len(heads.accept_lengths[0])  # fewer steps for the same text


def test_batch_with_padding_and_context_matches_per_row_hf():
    base = no_eos(tiny("llama"))
    a = torch.randint(1, V, (1, 5), generator=generator(11))
    b = torch.randint(1, V, (1, 9), generator=generator(12))
    ids = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    ids[0, 4:], mask[0, 4:] = a[0], 1
    ids[1], mask[1] = b[0], 1
    model = HydraModel(base, perturbed_heads(base, "medusa"), tree="tiny+ctx5", max_cache_len=128)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=40)
    assert torch.equal(out[0, 9:], hf_greedy(base, a, 40)[0, 5:])
    assert torch.equal(out[1, 9:], hf_greedy(base, b, 40)[0, 9:])


def test_sampling_with_context_is_seeded():
    base = no_eos(tiny("mistral"))
    ids = torch.randint(0, V, (1, 6), generator=generator(13))
    model = HydraModel(base, perturbed_heads(base, "hydra"), tree="tiny+ctx4", max_cache_len=128)
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(model.generate(ids, max_new_tokens=30, do_sample=True, temperature=0.8))
    assert torch.equal(runs[0], runs[1]) and runs[0].shape == (1, 36) and int(runs[0].min()) >= 0


@pytest.mark.parametrize("heads", ["hydra", "none"])
def test_cli_context_draft_keeps_hf_greedy_text(folders, capsys, heads):
    from hydra_fast import cli

    _, _, base, tok = folders
    args = common(folders, 24) + ["--context-draft", "6"] + (["--heads", "none"] if heads == "none" else [])
    assert cli.main(["generate", "Say hello hello hello.", *args]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == hf_answer(base, tok, [{"role": "user", "content": "Say hello hello hello."}], 24).strip()
    assert "+ 6 context drafts, mean accepted length" in err, err


@pytest.mark.slow
def test_context_draft_compiles_fullgraph():
    g = generator(17)
    history = torch.randint(0, 4, (3, 41), generator=g)
    valid = torch.tensor([2, 30, 41])
    compiled = torch.compile(context.draft, fullgraph=True, dynamic=False)
    assert torch.equal(compiled(history, valid, 6), context.draft(history, valid, 6))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("compile", [False, True], ids=["graph", "compiled"])
def test_cuda_graph_step_with_context_matches_hf(compile):
    base = no_eos(tiny("llama"))
    heads = perturbed_heads(base, "hydra++").cuda()  # perturbed on the CPU (seeded), then moved
    base = base.cuda()
    P, new, M = 8, 96, 6
    ids = torch.randint(0, V, (1, P), generator=generator(5)).cuda()
    ref = hf_greedy(base, ids, new + M + 1)
    for h in (None, heads):
        model = HydraModel(base, h, tree=f"tiny+ctx{M}", max_cache_len=256, compile=compile)
        out = model.generate(ids, max_new_tokens=new, return_dict_in_generate=True)
        assert torch.equal(out.sequences, ref[:, : P + new])
        if h is None:  # context drafts only: every step accepts exactly what the spec predicts
            assert out.accept_lengths[0] == simulate_plain(ref[0].tolist(), P, new, M)


PASSAGE = ("The lighthouse keeper climbed the spiral stairs every evening at dusk. He polished the great lens, "
           "trimmed the wick, and wrote the weather in a leather-bound log: wind from the north-east, sea "
           "moderate, two fishing boats returning late to the harbour at Port Ellis.")


@pytest.mark.slow
def test_smollm2_copies_a_passage_and_context_drafts_are_accepted():
    """On a prompt whose answer copies a passage, the context chain adds accepted tokens to the shipped heads'
    (and alone, as prompt-lookup decoding, accepts many); greedy output stays HF's."""
    import hydra_fast
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hydra_fast import hub
    from hydra_fast.heads import DraftHeads

    path = hub.default_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    msg = f"Repeat the following text exactly, word for word:\n\n{PASSAGE}"
    ids = tok.apply_chat_template([{"role": "user", "content": msg}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    ref = base.generate(ids, max_new_tokens=64, do_sample=False)
    heads = DraftHeads.from_pretrained(hydra_fast.default_heads_path("hydra++"), base)
    model = HydraModel(base, heads, tree="mc_sim_7b_63", max_cache_len=512)
    tau = {}
    for name, kw in {"heads": dict(), "heads+ctx": dict(context_draft=10),
                     "ctx": dict(context_draft=10, use_heads=False)}.items():
        out = model.generate(ids, max_new_tokens=64, return_dict_in_generate=True, **kw)
        assert torch.equal(out.sequences, ref), (name, tok.decode(out.sequences[0, ids.shape[1]:]))
        steps = out.accept_lengths[0]
        tau[name] = sum(steps) / len(steps)
    assert tau["heads+ctx"] > tau["heads"] and tau["ctx"] > 2.0, tau

"""Draft heads on tiny random HF models: init property, tree drafting, training forward, checkpoints."""
import json
import os

import pytest
import torch
import torch.nn.functional as F
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from hydra_fast import ops, reference
from hydra_fast.heads import (DraftHeads, HeadsCheckpointError, HeadsConfig, HeadsMismatchError,
                              check_compatible, fingerprint)
from hydra_fast.tree import Tree

KINDS = ["medusa", "hydra", "hydra++"]
ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16}),
    "mistral": (MistralConfig, MistralForCausalLM, {"head_dim": 16}),
}


def tiny(arch="llama", seed=0, vocab=211, dtype=torch.float32):
    cfg_cls, model_cls, extra = ARCHS[arch]
    torch.manual_seed(seed)
    config = cfg_cls(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=128, **extra)
    model = model_cls(config).to(dtype).eval()
    model.requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def llama():
    return tiny()


def randomize(heads, seed=1, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in heads.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * std)
    return heads


def kernel_impl():
    impl = ops.implementation("cpu")
    if impl is reference or not torch._C._dispatch_has_kernel_for_dispatch_key(
            "hydra_fast::draft_head_mlp", "CPU"):
        pytest.skip("hydra_fast._C has no CPU draft_head_mlp kernel")
    return impl


def io(base):
    return base.get_input_embeddings().weight, base.get_output_embeddings()


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("kind", KINDS)
def test_untrained_heads_reproduce_base_lm_head(arch, kind):
    base = tiny(arch)
    embed, lm_head = io(base)
    heads = DraftHeads.from_base(base, kind)
    assert len(heads.heads) == 4 and len(heads.heads[0].blocks) == (4 if kind == "hydra++" else 1)
    assert (heads.prefix_layer is not None) == (kind == "hydra++")
    x = torch.randn(7, 64)
    for i, head in enumerate(heads.heads):
        assert head.path_len == (0 if kind == "medusa" else i + 1)
        tokens = torch.randint(0, 211, (7, head.path_len))
        y = head(x, tokens, embed, reference)
        torch.testing.assert_close(heads.logits(i, y, lm_head), lm_head(x), atol=1e-6, rtol=0)


def test_untrained_own_lm_head_copies_base(llama):
    embed, lm_head = io(llama)
    heads = DraftHeads.from_base(llama, "hydra", own_lm_head=True)
    x = torch.randn(5, 64)
    for i, head in enumerate(heads.heads):
        assert head.lm_head is not None and torch.equal(head.lm_head.weight, lm_head.weight)
        y = head(x, torch.randint(0, 211, (5, i + 1)), embed, reference)
        torch.testing.assert_close(heads.logits(i, y, lm_head), lm_head(x), atol=1e-6, rtol=0)


def test_prefix_layer_copy_init_is_the_last_decoder_layer(llama):
    heads = DraftHeads.from_base(llama, "hydra++", prefix_init="copy")
    last = llama.model.layers[-1]
    assert type(heads.prefix_layer) is type(last)
    # built on the live base config: use_tree_attention(base) switches the prefix layer's attention too
    assert heads.prefix_layer.self_attn.config is llama.config
    for (n, p), (m, q) in zip(heads.prefix_layer.state_dict().items(), last.state_dict().items()):
        assert n == m and torch.equal(p, q)
    # run over the last layer's inputs, it reproduces the base's final hidden state
    ids = torch.randint(0, 211, (2, 9))
    hs = llama(ids, output_hidden_states=True).hidden_states
    pos = torch.arange(9).view(1, 9).expand(2, 9)
    pe = llama.model.rotary_emb(hs[-2], pos)
    out = llama.model.norm(heads._prefix(hs[-2], pe, None))
    torch.testing.assert_close(out, hs[-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(heads._prefix(hs[-2], pe, torch.ones(2, 9)), heads._prefix(hs[-2], pe, None))


def test_prefix_layer_identity_init_passes_hidden_states_through(llama):
    heads = DraftHeads.from_base(llama, "hydra++")  # prefix_init="identity"
    last = llama.model.layers[-1]
    assert torch.equal(heads.prefix_layer.self_attn.q_proj.weight, last.self_attn.q_proj.weight)
    assert not heads.prefix_layer.self_attn.o_proj.weight.any() and not heads.prefix_layer.mlp.down_proj.weight.any()
    hidden = torch.randn(2, 9, 64)
    pos = torch.arange(9).view(1, 9).expand(2, 9)
    out = heads._prefix(hidden, llama.model.rotary_emb(hidden, pos), None)
    torch.testing.assert_close(out, hidden)
    with pytest.raises(ValueError, match="prefix_init"):
        DraftHeads.from_base(llama, "hydra++", prefix_init="random")


@pytest.mark.parametrize("kind", KINDS)
def test_no_shared_parameters(llama, kind):
    heads = DraftHeads.from_base(llama, kind, own_lm_head=True)
    tensors = list(heads.parameters()) + list(heads.buffers())
    ptrs = [t.untyped_storage().data_ptr() for t in tensors]
    assert len(set(ptrs)) == len(ptrs)
    base_ptrs = {t.untyped_storage().data_ptr() for t in llama.parameters()}
    assert not base_ptrs & set(ptrs)
    assert heads.heads[0] is not heads.heads[1]


def slow_draft(heads, hidden, root, tree, embed, lm_head):
    """Node by node, one row at a time, from each node's own path."""
    B, N = hidden.shape[0], tree.num_nodes
    cand = torch.full((B, N), -1, dtype=torch.long)
    cand[:, 0] = root
    topk = {lv.depth: lv.topk for lv in tree.buffers().levels}
    for b in range(B):
        for n in range(1, N):
            node = tree.nodes[n]
            d, parent = len(node), tree.parents[n]
            head = heads.heads[d - 1]
            path = cand[b, tree.ancestors(parent)][: head.path_len].view(1, -1)  # root..parent or nothing
            x = head(hidden[b:b + 1], path, embed, reference)
            ids = torch.topk(heads.logits(d - 1, x, lm_head), topk[d], dim=-1).indices[0]
            cand[b, n] = ids[node[-1]]
    return cand


@pytest.mark.parametrize("tree", ["tiny", "mc_sim_7b_63"])
@pytest.mark.parametrize("kind, own", [(kind, kind == "medusa") for kind in KINDS] + [("medusa", False)])
def test_draft_matches_slow_recomputation(kind, own, tree):
    """Medusa with the shared LM head: its levels' states stacked into one product (_pathless_guesses)."""
    base = tiny(dtype=torch.float64)  # float64: no near-ties between batched and one-row evaluation
    embed, lm_head = io(base)
    heads = randomize(DraftHeads.from_base(base, kind, own_lm_head=own))
    tree = Tree.from_choices(tree)
    hidden = torch.randn(3, 64, dtype=torch.float64)
    root = torch.randint(0, 211, (3,))
    cand = heads.draft(hidden, root, tree.buffers(), embed, lm_head, reference)
    assert cand.shape == (3, tree.num_nodes) and cand.dtype == torch.long
    assert torch.equal(cand[:, 0], root)
    assert torch.equal(cand, slow_draft(heads, hidden, root, tree, embed, lm_head))
    if kind != "medusa":  # siblings are distinct guesses of one parent
        bufs = tree.buffers()
        for lv in bufs.levels:
            for s in range(lv.parent_nodes.numel()):
                kids = lv.child_nodes[lv.child_slot == s]
                assert all(len(set(cand[b, kids].tolist())) == kids.numel() for b in range(3))


@pytest.mark.parametrize("kind", KINDS)
def test_draft_kernel_matches_reference(llama, kind):
    impl = kernel_impl()
    embed, lm_head = io(llama)
    heads = randomize(DraftHeads.from_base(llama, kind))
    bufs = Tree.from_choices("mc_sim_7b_63").buffers()
    hidden, root = torch.randn(2, 64), torch.randint(0, 211, (2,))
    assert torch.equal(heads.draft(hidden, root, bufs, embed, lm_head, impl),
                       heads.draft(hidden, root, bufs, embed, lm_head, reference))


@pytest.mark.parametrize("kind", ["medusa", "hydra"])
def test_draft_compiles_fullgraph(llama, kind):
    embed, lm_head = io(llama)
    heads = randomize(DraftHeads.from_base(llama, kind))
    bufs = Tree.from_choices("tiny").buffers()
    hidden, root = torch.randn(2, 64), torch.randint(0, 211, (2,))
    eager = heads.draft(hidden, root, bufs, embed, lm_head, reference)
    torch._dynamo.reset()
    compiled = torch.compile(heads.draft, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(hidden, root, bufs, embed, lm_head, reference), eager)


def test_draft_compiles_fullgraph_with_kernels(llama):
    impl = kernel_impl()
    embed, lm_head = io(llama)
    heads = randomize(DraftHeads.from_base(llama, "hydra"))
    bufs = Tree.from_choices("tiny").buffers()
    hidden, root = torch.randn(2, 64), torch.randint(0, 211, (2,))
    eager = heads.draft(hidden, root, bufs, embed, lm_head, impl)
    torch._dynamo.reset()
    compiled = torch.compile(heads.draft, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(hidden, root, bufs, embed, lm_head, impl), eager)


def test_draft_plain_tree_and_too_deep(llama):
    embed, lm_head = io(llama)
    heads = DraftHeads.from_base(llama, "hydra", num_heads=2)
    root = torch.tensor([4, 9])
    cand = heads.draft(torch.randn(2, 64), root, Tree.plain().buffers(), embed, lm_head, reference)
    assert torch.equal(cand, root.view(2, 1))
    with pytest.raises(ValueError, match="4 deep but there are only 2 heads"):
        heads.draft(torch.randn(2, 64), root, Tree.from_choices("chain4").buffers(), embed, lm_head, reference)


@pytest.mark.parametrize("kind", KINDS)
def test_forward_train(llama, kind):
    embed, lm_head = io(llama)
    heads = randomize(DraftHeads.from_base(llama, kind), std=0.05)
    B, T = 2, 8
    ids = torch.randint(0, 211, (B, T))
    hidden = torch.randn(B, T, 64)
    pe = llama.model.rotary_emb(hidden, torch.arange(T).view(1, T).expand(B, T))
    logits = heads.forward_train(hidden, ids, lm_head, embed, position_embeddings=pe)
    assert len(logits) == 4 and all(lg.shape == (B, T, 211) for lg in logits)
    # alignment: head i at t reads hidden[t] (after the prefix layer) and ids[t + 1 .. t + i + 1]
    h = heads._prefix(hidden, pe, None) if kind == "hydra++" else hidden
    for i, head in enumerate(heads.heads):
        for t in range(T - i - 2):
            path = ids[:, t + 1: t + 1 + head.path_len]
            want = heads.logits(i, head(h[:, t], path, embed, reference), lm_head)
            torch.testing.assert_close(logits[i][:, t], want, atol=1e-5, rtol=1e-5)
    loss = sum(F.cross_entropy(lg[:, : T - i - 2].reshape(-1, 211), ids[:, i + 2:].reshape(-1))
               for i, lg in enumerate(logits))
    loss.backward()
    for name, p in heads.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in llama.parameters())


def test_forward_train_prefix_is_causal_and_needs_positions(llama):
    embed, lm_head = io(llama)
    heads = randomize(DraftHeads.from_base(llama, "hydra++"), std=0.05)
    ids, hidden = torch.randint(0, 211, (1, 6)), torch.randn(1, 6, 64)
    with pytest.raises(ValueError, match="position_embeddings"):
        heads.forward_train(hidden, ids, lm_head, embed)
    pe = llama.model.rotary_emb(hidden, torch.arange(6).view(1, 6))
    out = heads._prefix(hidden, pe, None)
    changed = hidden.clone()
    changed[:, 4:] += 1.0
    out2 = heads._prefix(changed, pe, None)
    torch.testing.assert_close(out[:, :4], out2[:, :4])
    assert not torch.allclose(out[:, 4:], out2[:, 4:])


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip(tmp_path, llama, kind):
    heads = randomize(DraftHeads.from_base(llama, kind, own_lm_head=kind == "medusa"))
    heads.save_pretrained(tmp_path, max_shard_size="40KB")
    files = sorted(os.listdir(tmp_path))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors.index.json" in files and "config.json" in files
    loaded = DraftHeads.from_pretrained(tmp_path, llama)
    assert loaded.config == heads.config
    a, b = heads.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # re-saving unsharded replaces the shards
    heads.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    again = DraftHeads.from_pretrained(tmp_path, llama).state_dict()
    assert all(torch.equal(a[k], again[k]) for k in a)


def test_save_tied_tensors_and_load_in_other_dtype(tmp_path, llama):
    heads = randomize(DraftHeads.from_base(llama, "medusa", own_lm_head=True))
    heads.heads[1].lm_head.weight = heads.heads[0].lm_head.weight  # shared storage: safetensors refuses as is
    heads.save_pretrained(tmp_path)
    loaded = DraftHeads.from_pretrained(tmp_path, llama.to(torch.bfloat16))
    llama.to(torch.float32)
    assert loaded.heads[1].lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.heads[1].lm_head.weight, heads.heads[0].lm_head.weight.to(torch.bfloat16))
    ptrs = [p.untyped_storage().data_ptr() for p in loaded.parameters()]
    assert len(set(ptrs)) == len(ptrs)


def test_fingerprint(llama):
    fp = fingerprint(llama)
    assert (fp.architecture, fp.model_type, fp.hidden_size, fp.vocab_size) == ("LlamaForCausalLM", "llama", 64, 211)
    assert fp.differences(fingerprint(tiny(dtype=torch.bfloat16))) == []  # same model, other precision
    assert fp.differences(fingerprint(tiny(seed=1))) == ["lm_head_sketch"]


@pytest.mark.parametrize("other, message", [
    (lambda: tiny(vocab=223), "vocab 211"),
    (lambda: tiny(seed=1), "lm_head_sketch differ"),
    (lambda: tiny("qwen2"), "architecture, model_type, lm_head_sketch differ"),
])
def test_load_onto_other_base_raises(tmp_path, llama, other, message):
    DraftHeads.from_base(llama, "hydra").save_pretrained(tmp_path)
    with pytest.raises(HeadsMismatchError) as err:
        DraftHeads.from_pretrained(tmp_path, other())
    text = str(err.value)
    assert message in text and "were trained for LlamaForCausalLM" in text and "train heads for this model" in text
    assert isinstance(err.value, ValueError)


def test_check_compatible(llama):
    heads = DraftHeads.from_base(llama, "medusa")
    check_compatible(heads, llama)
    with pytest.raises(HeadsMismatchError, match="vocab 223"):
        check_compatible(heads, tiny(vocab=223))


def _corrupt(tmp_path, what):
    files = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
    if what == "missing shard":
        os.remove(tmp_path / files[1])
        return files[1]
    if what == "truncated shard":
        data = (tmp_path / files[0]).read_bytes()
        (tmp_path / files[0]).write_bytes(data[: len(data) // 2])
        return files[0]
    if what == "garbled config":
        (tmp_path / "config.json").write_text("{not json")
        return "config.json"
    if what == "base model config":
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
        return "not a hydra_fast heads config"
    if what == "missing config":
        os.remove(tmp_path / "config.json")
        return "config.json"
    from safetensors.torch import load_file, save_file
    tensors = load_file(tmp_path / files[0])
    name = sorted(tensors)[0]
    if what == "missing tensor":
        del tensors[name]
    else:
        tensors[name] = torch.zeros(3, 3)
    save_file(tensors, tmp_path / files[0])
    return files[0]


@pytest.mark.parametrize("what", ["missing shard", "truncated shard", "garbled config", "base model config",
                                  "missing config", "missing tensor", "wrong shape"])
def test_corrupt_checkpoint_raises(tmp_path, llama, what):
    DraftHeads.from_base(llama, "hydra").save_pretrained(tmp_path, max_shard_size="40KB")
    expected = _corrupt(tmp_path, what)
    with pytest.raises(HeadsCheckpointError) as err:
        DraftHeads.from_pretrained(tmp_path, llama)
    assert expected in str(err.value)


def test_config_validation(llama):
    fp = fingerprint(llama)
    with pytest.raises(ValueError, match="unknown heads kind 'eagle'; known kinds: medusa, hydra, hydra"):
        HeadsConfig(kind="eagle", hidden_size=64, vocab_size=211, base=fp)
    cfg = HeadsConfig(kind="hydra++", hidden_size=64, vocab_size=211, base=fp)
    assert cfg.num_layers == 4 and HeadsConfig.from_dict(cfg.to_dict()) == cfg
    assert HeadsConfig(kind="medusa", hidden_size=64, vocab_size=211, base=fp).num_layers == 1
    # without a live base config, the prefix layer is built from the saved dict
    standalone = DraftHeads(DraftHeads.from_base(llama, "hydra++").config)
    assert type(standalone.prefix_layer) is type(llama.model.layers[0])
    assert standalone.prefix_layer.self_attn.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="need the base model config"):
        DraftHeads(HeadsConfig(kind="hydra++", hidden_size=64, vocab_size=211, base=fp))


@pytest.mark.parametrize("own", [False, True])
def test_medusa_levels_share_one_lm_head_product(llama, monkeypatch, own):
    """Medusa's heads read no path: with the shared LM head every level's guesses come from one product and one
    top-k (the LM head read once a step); with their own LM heads, one each."""
    embed, lm_head = io(llama)
    heads = randomize(DraftHeads.from_base(llama, "medusa", own_lm_head=own))
    tree = Tree.from_choices("mc_sim_7b_63")
    calls = []
    real = heads._draft_topk
    monkeypatch.setattr(heads, "_draft_topk", lambda i, x, *a: calls.append(x.shape[0]) or real(i, x, *a))
    heads.draft(torch.randn(2, llama.config.hidden_size), torch.tensor([3, 5]), tree.buffers(), embed, lm_head,
                reference)
    depth = len(tree.buffers().levels)
    assert calls == ([2] * depth if own else [2 * depth])

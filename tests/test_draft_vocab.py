"""The reduced draft vocabulary: compact LM heads in the draft, greedy output unchanged, the vocab command."""
import json

import pytest
import torch
from _train_tiny import char_tokenizer, tiny_llama
from conftest import cuda_ready
from safetensors.torch import load_file
from test_heads import io, randomize, tiny

from hydra_fast import reference
from hydra_fast.draft_vocab import DRAFT_VOCAB_NAME, DraftVocabFile, count_answer_tokens, frequency_order
from hydra_fast.heads import DraftHeads, HeadsCheckpointError, HeadsConfig
from hydra_fast.model import HydraModel
from hydra_fast.train import BuildConfig, build
from hydra_fast.train.cli import main as train_main
from hydra_fast.tree import Tree

V = 211
CASES = [("medusa", False), ("hydra", False), ("hydra++", False), ("hydra", True)]  # (kind, own LM heads)


def heads_for(base, kind, own, seed=1):
    return randomize(DraftHeads.from_base(base, kind, own_lm_head=own), seed=seed, std=0.2).eval()


def draft(heads, base, hidden, root, tree="mc_sim_7b_63"):
    embed, lm_head = io(base)
    return heads.draft(hidden, root, Tree.from_choices(tree).buffers(), embed, lm_head, reference)


@pytest.mark.parametrize("kind,own", CASES)
def test_full_size_draft_vocab_equals_the_full_draft(kind, own):
    base = tiny(dtype=torch.float64)
    heads = heads_for(base, kind, own)
    hidden, root = torch.randn(3, 64, dtype=torch.float64), torch.randint(0, V, (3,))
    full = draft(heads, base, hidden, root)
    heads.set_draft_vocab(torch.randperm(V, generator=torch.Generator().manual_seed(0)))  # V' = V, shuffled
    assert heads.draft_vocab.size == V
    assert torch.equal(draft(heads, base, hidden, root), full)


@pytest.mark.parametrize("kind,own", CASES)
def test_reduced_draft_is_the_full_draft_restricted_to_the_set(kind, own):
    base = tiny(dtype=torch.float64)
    heads = heads_for(base, kind, own)
    keep = torch.randperm(V, generator=torch.Generator().manual_seed(3))[:37]  # V' = 37
    hidden, root = torch.randn(4, 64, dtype=torch.float64), torch.randint(0, V, (4,))
    heads.set_draft_vocab(keep)
    cand = draft(heads, base, hidden, root)
    assert torch.isin(cand[:, 1:], keep).all()  # every drafted node is in the reduced set
    # the same draft from the full LM heads with every other token's logit pushed to -inf
    masked = heads_for(base, kind, own)
    outside = torch.ones(V, dtype=torch.bool)
    outside[keep] = False
    with torch.no_grad():
        for i, head in enumerate(masked.heads):
            lm = head.lm_head if own else None
            if lm is None:
                lm = head.lm_head = torch.nn.Linear(64, V, bias=True, dtype=torch.float64)
                lm.weight.copy_(base.get_output_embeddings().weight)
                lm.bias.zero_()
            else:
                lm.bias = torch.nn.Parameter(torch.zeros(V, dtype=torch.float64))
            lm.bias.masked_fill_(outside, float("-inf"))
    assert torch.equal(cand, draft(masked, base, hidden, root))


def test_compact_head_follows_lm_head_changes():
    base = tiny(dtype=torch.float64)
    heads = heads_for(base, "hydra", False)
    heads.set_draft_vocab(torch.arange(0, V, 3))
    hidden, root = torch.randn(2, 64, dtype=torch.float64), torch.randint(0, V, (2,))
    before = draft(heads, base, hidden, root)
    lm = base.get_output_embeddings()
    with torch.no_grad():
        lm.weight.mul_(-1.0)  # in place: same storage, new version
    flipped = draft(heads, base, hidden, root)
    fresh = heads_for(base, "hydra", False)
    fresh.set_draft_vocab(torch.arange(0, V, 3))
    assert torch.equal(flipped, draft(fresh, base, hidden, root)) and not torch.equal(flipped, before)
    lm.weight = torch.nn.Parameter(lm.weight.detach() * -1.0)  # new storage
    assert torch.equal(draft(heads, base, hidden, root), before)
    heads.set_draft_vocab(torch.arange(0, V, 3))
    with torch.inference_mode():  # compact heads made here cannot be updated in place outside it
        assert torch.equal(draft(heads, base, hidden, root), before)
    with torch.no_grad():
        lm.weight.mul_(-1.0)
    assert torch.equal(draft(heads, base, hidden, root), flipped)


def test_reduced_draft_compiles_fullgraph():
    base = tiny()
    heads = heads_for(base, "hydra", False)
    heads.set_draft_vocab(torch.arange(50))
    embed, lm_head = io(base)
    bufs = Tree.from_choices("tiny").buffers()
    hidden, root = torch.randn(2, 64), torch.randint(0, V, (2,))
    eager = heads.draft(hidden, root, bufs, embed, lm_head, reference)
    heads.prepare_draft(lm_head)
    torch._dynamo.reset()
    compiled = torch.compile(heads.draft, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(hidden, root, bufs, embed, lm_head, reference), eager)


def test_tree_wider_than_the_draft_vocab_is_refused():
    base = tiny()
    heads = heads_for(base, "medusa", False)
    heads.set_draft_vocab(torch.arange(5))
    with pytest.raises(ValueError, match="top 10 tokens at depth 1 but the draft vocabulary has 5"):
        draft(heads, base, torch.randn(1, 64), torch.tensor([3]))
    with pytest.raises(ValueError, match="distinct token ids"):
        heads.set_draft_vocab(torch.tensor([1, 1, 2]))
    with pytest.raises(ValueError, match="needs the heads folder's draft_vocab.safetensors"):
        heads.use_draft_vocab(20)


@pytest.mark.parametrize("kind", ["hydra++"])
def test_greedy_output_matches_hf_with_a_reduced_vocab(kind):
    base = tiny()
    heads = DraftHeads.from_base(base, kind)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.02)
    ids = torch.randint(3, V, (2, 9), generator=torch.Generator().manual_seed(5))
    want = base.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=0)
    # the tokens the base writes first, then others: a set in which some drafts succeed and others cannot
    seen = want[:, 9:].flatten().unique()
    order = torch.cat([seen, torch.tensor([t for t in range(V) if t not in set(seen.tolist())])])
    heads.set_draft_vocab(order[: len(seen) // 2 + 12])
    model = HydraModel(base, heads, tree="mc_sim_7b_63", use_kernels=False)
    out = model.generate(ids, max_new_tokens=24, return_dict_in_generate=True)
    assert torch.equal(out.sequences, want)
    assert -1 in heads.draft_vocab._compact  # the engine drafted through the compact LM head


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_ready(), reason="needs a CUDA device and hydra_fast._C built with CUDA")
def test_cuda_graph_step_with_a_reduced_vocab_follows_lm_head_updates():
    base = tiny().cuda()
    heads = DraftHeads.from_base(base, "hydra")
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)).cuda() * 0.02)
    heads.set_draft_vocab(torch.randperm(V, generator=torch.Generator().manual_seed(6))[:64])
    model = HydraModel(base, heads, tree="mc_sim_7b_63", cuda_graph=True)
    ids = torch.randint(3, V, (1, 9), generator=torch.Generator().manual_seed(5)).cuda()
    for round_ in range(2):
        want = base.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(ids, max_new_tokens=24), want)
        assert model._runner.graph is not None
        lm = base.get_output_embeddings()
        _, compact, _ = heads.draft_vocab._compact[-1]
        assert torch.equal(compact, lm.weight[heads.draft_vocab.ids])  # gathered from the current LM head
        if round_ == 0:
            first = compact.data_ptr()
            with torch.no_grad():  # the captured graph must see the update: the compact head is refreshed in place
                lm.weight.add_(torch.randn(lm.weight.shape, generator=torch.Generator().manual_seed(8)).cuda() * 0.1)
        else:
            assert compact.data_ptr() == first


def test_config_field_round_trips(tmp_path):
    base = tiny()
    heads = heads_for(base, "hydra", False)
    cfg = heads.config
    assert cfg.draft_vocab_size == 0
    for n in (0, 17, V):
        c = HeadsConfig.from_dict(json.loads(json.dumps({**cfg.to_dict(), "draft_vocab_size": n})))
        assert c.draft_vocab_size == n and c == HeadsConfig(**{**vars(cfg), "draft_vocab_size": n})
    old = cfg.to_dict()
    del old["draft_vocab_size"]  # configs written before the field load as the full vocabulary
    assert HeadsConfig.from_dict(old).draft_vocab_size == 0
    with pytest.raises(ValueError, match="draft_vocab_size must be in 0..211"):
        HeadsConfig.from_dict({**cfg.to_dict(), "draft_vocab_size": V + 1})
    # through a heads folder: the file and the size survive save and load; draft_vocab= overrides the size
    heads.save_pretrained(tmp_path)
    with pytest.raises(HeadsCheckpointError, match="draft_vocab.safetensors: missing"):
        DraftHeads.from_pretrained(tmp_path, base, draft_vocab=30)
    counts = torch.randint(0, 50, (V,), generator=torch.Generator().manual_seed(4))
    frequency_order(counts, forced=[7]).save(tmp_path)
    loaded = DraftHeads.from_pretrained(tmp_path, base, draft_vocab=30)
    assert loaded.draft_vocab.size == 30 and loaded.config.draft_vocab_size == 30
    assert int(loaded.draft_vocab.ids[0]) == 7
    loaded.save_pretrained(tmp_path / "again")
    again = DraftHeads.from_pretrained(tmp_path / "again", base)
    assert again.config.draft_vocab_size == 30 and torch.equal(again.draft_vocab.ids, loaded.draft_vocab.ids)
    assert DraftHeads.from_pretrained(tmp_path / "again", base, draft_vocab=0).draft_vocab is None
    assert DraftHeads.from_pretrained(tmp_path / "again", base, draft_vocab=V).draft_vocab is None
    assert HydraModel.from_pretrained(base, tmp_path / "again", draft_vocab=12).heads.draft_vocab.size == 12
    (tmp_path / "again" / DRAFT_VOCAB_NAME).write_bytes(b"garbage")
    with pytest.raises(HeadsCheckpointError, match="not a readable draft vocabulary"):
        DraftHeads.from_pretrained(tmp_path / "again", base)


def test_frequency_order():
    counts = torch.tensor([5, 0, 9, 5, 1, 9])
    f = frequency_order(counts, forced=[1, 4])
    assert f.ids.tolist() == [1, 4, 2, 5, 0, 3] and f.counts.tolist() == [0, 1, 9, 9, 5, 5] and f.forced == 2
    assert f.coverage(4) == pytest.approx(19 / 29)
    samples = [(torch.tensor([9, 9, 1, 2, 2]), 2), (torch.tensor([3, 2, 0]), 1)]
    assert count_answer_tokens(samples, 4).tolist() == [1, 1, 3, 0]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        count_answer_tokens(samples, 2)


def test_vocab_command_counts_the_answer_tokens(tmp_path, capsys):
    model = tiny_llama()
    data = tmp_path / "data"
    build(model, char_tokenizer(), data, BuildConfig(sources=("builtin:6",), max_new_tokens=12, batch_size=6,
                                                     shard_size=3), progress=False)
    heads_dir = tmp_path / "heads"
    DraftHeads.from_base(model, "hydra").save_pretrained(heads_dir)
    assert train_main(["vocab", "--data", str(data), "--heads", str(heads_dir), "--size", "40"]) == 0
    assert "draft vocabulary 40 of 128 tokens" in capsys.readouterr().out
    # recount from the shard files themselves
    want = torch.zeros(128, dtype=torch.long)
    prompt_sets = []
    for shard in sorted(data.glob("shard-*.safetensors")):
        t = load_file(shard)
        off, starts = t["offsets"].tolist(), t["answer_start"].tolist()
        for i, s in enumerate(starts):
            ids = t["tokens"][off[i]: off[i + 1]].long()
            want += torch.bincount(ids[s:], minlength=128)
            prompt_sets.append(set(ids[:s].tolist()))
    f = DraftVocabFile.load(heads_dir, 128)
    assert torch.equal(f.counts, want[f.ids])
    forced = list(dict.fromkeys([2] + sorted(set.intersection(*prompt_sets))))  # eos, the chat template
    assert f.ids[: f.forced].tolist() == forced
    rest = f.counts[f.forced:]
    assert (rest[:-1] >= rest[1:]).all()  # most frequent first
    config = json.loads((heads_dir / "config.json").read_text())
    assert config["draft_vocab_size"] == 40
    assert not list(heads_dir.glob("*.tmp"))
    loaded = DraftHeads.from_pretrained(heads_dir, model)
    assert torch.equal(loaded.draft_vocab.ids, f.ids[:40])
    # default size: the smallest multiple of 64 covering 99% (here the whole 128-token vocabulary: full)
    assert train_main(["vocab", "--data", str(data), "--heads", str(heads_dir)]) == 0
    assert json.loads((heads_dir / "config.json").read_text())["draft_vocab_size"] in (0, 64)
    assert train_main(["vocab", "--data", str(data), "--heads", str(tmp_path / "nowhere")]) == 2
    assert "config.json: missing; is" in capsys.readouterr().err

"""Head training on tiny random models (CPU): objectives, the loop, checkpoint/resume, DDP over gloo, the CLI
and the default-heads pipeline."""
import csv
import io
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _train_tiny import char_tokenizer, tiny_llama

from hydra_fast.heads import DraftHeads
from hydra_fast.train import checkpoint as ckpt
from hydra_fast.train import cli
from hydra_fast.train.config import RECIPES, HeadRecipe, TrainConfig, recipes_for
from hydra_fast.train.dataset import SelfDistillData, collate
from hydra_fast.train.losses import HeadsObjective, make_targets
from hydra_fast.train.selfdistill import BuildConfig, build
from hydra_fast.train.trainer import Trainer, lr_multiplier

TESTS = Path(__file__).parent
ROOT = TESTS.parent
KINDS = ["medusa", "hydra", "hydra++"]


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, model):
    d = tmp_path_factory.mktemp("data")
    build(model, char_tokenizer(), d, BuildConfig(sources=("builtin:16",), max_new_tokens=16, batch_size=8,
                                                   shard_size=8), progress=False)
    return d


@pytest.fixture(scope="module")
def data(data_dir, model):
    return SelfDistillData(data_dir, model)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, model):
    d = tmp_path_factory.mktemp("model")
    model.save_pretrained(d)
    char_tokenizer().save_pretrained(d)
    return d


def config(kinds=("hydra",), **kw):
    recipe_kw = {k: kw.pop(k) for k in ("lr", "teacher_weight", "dropout", "noise", "num_heads") if k in kw}
    base = dict(recipes=recipes_for(list(kinds), **{"lr": 1e-2, **recipe_kw}), steps=30, batch_size=4,
                log_every=5, ckpt_every=0, eval_fraction=0.0, warmup=0.1)
    return TrainConfig(**{**base, **kw})


def params(trainer):
    return {s.recipe.kind: {k: v.clone() for k, v in s.heads.state_dict().items()} for s in trainer.sets}


def assert_same_params(a, b, exact=True):
    assert a.keys() == b.keys()
    for kind in a:
        for name in a[kind]:
            if exact:
                assert torch.equal(a[kind][name], b[kind][name]), f"{kind} {name}"
            else:
                torch.testing.assert_close(a[kind][name], b[kind][name], msg=f"{kind} {name}")


# ------------------------------------------------------------------------------------------ objective
@pytest.mark.parametrize("kind", KINDS)
def test_train_states_match_forward_train(model, kind):
    heads = DraftHeads.from_base(model, kind)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ids = torch.randint(0, 128, (2, 9))
    hidden = torch.randn(2, 9, 64)
    pe = model.model.rotary_emb(hidden, torch.arange(9).view(1, 9).expand(2, 9))
    lm_head = model.get_output_embeddings()
    embed = model.get_input_embeddings().weight
    logits = heads.forward_train(hidden, ids, lm_head, embed, position_embeddings=pe)
    states = heads.train_states(hidden, ids, embed, position_embeddings=pe)
    for i, (lg, st) in enumerate(zip(logits, states)):
        assert st.shape == (2, 9, 64)
        torch.testing.assert_close(heads.logits(i, st.reshape(18, 64), lm_head).view(2, 9, -1), lg)


def test_targets_alignment_and_mask(model):
    ids = torch.tensor([[10, 11, 12, 13, 14, 15, 16], [20, 21, 22, 23, 0, 0, 0]])
    batch = collate([(ids[0], 3), (ids[1, :4], 2)], max_len=16)
    hidden = torch.randn(2, 7, 64)
    lm = model.get_output_embeddings()
    tg = make_targets(batch.input_ids, batch.answer_mask, 3, hidden, lm)
    # head i at t predicts t + i + 2; only answer tokens (row 0 from 3, row 1 positions 2..3) are targets
    assert tg.rows[0].tolist() == [1, 2, 3, 4, 7, 8] and tg.labels[0].tolist() == [13, 14, 15, 16, 22, 23]
    assert tg.rows[1].tolist() == [0, 1, 2, 3, 7] and tg.labels[1].tolist() == [13, 14, 15, 16, 23]
    assert tg.rows[2].tolist() == [0, 1, 2]
    # soft targets: the base distribution at t + i + 1 (which predicts the same token t + i + 2)
    teacher = torch.log_softmax(lm(hidden.reshape(14, 64)), -1)
    for i in range(3):
        torch.testing.assert_close(tg.teacher_logp[tg.teacher_rows[i]], teacher[tg.rows[i] + i + 1])


def test_loss_is_weighted_ce_plus_kl(model):
    recipe = HeadRecipe("medusa", num_heads=2, teacher_weight=0.25, head_decay=0.5)
    heads = DraftHeads.from_base(model, "medusa", num_heads=2)
    obj = HeadsObjective(heads, recipe).eval()
    ids = torch.randint(4, 128, (2, 8))
    batch = collate([(ids[0], 2), (ids[1], 3)], max_len=8)
    hidden = torch.randn(2, 8, 64)
    lm = model.get_output_embeddings()
    tg = make_targets(batch.input_ids, batch.answer_mask, 2, hidden, lm)
    loss, stats = obj(hidden, batch.input_ids, batch.attention_mask, None, tg, model.get_input_embeddings().weight,
                      lm)
    want = 0.0
    for i in range(2):
        logp = torch.log_softmax(lm(hidden.reshape(16, 64)[tg.rows[i]]), -1)  # untrained medusa head = LM head
        ce = F.nll_loss(logp, tg.labels[i])
        p_t = tg.teacher_logp[tg.teacher_rows[i]]
        kl = (p_t.exp() * (p_t - logp)).sum(-1).mean()
        want += 0.5 ** i * (0.75 * ce + 0.25 * kl)
        assert stats[i, 4] == tg.labels[i].numel()
        assert stats[i, 2] == (logp.argmax(-1) == tg.labels[i]).sum()
    torch.testing.assert_close(loss, want)


def test_lr_schedule():
    assert lr_multiplier(0.0, 0.1, 0.1) == 0.0
    assert lr_multiplier(0.05, 0.1, 0.1) == pytest.approx(0.5)
    assert lr_multiplier(0.1, 0.1, 0.1) == pytest.approx(1.0)
    assert lr_multiplier(0.55, 0.1, 0.1) == pytest.approx(0.55)
    assert lr_multiplier(1.0, 0.1, 0.1) == pytest.approx(0.1)
    assert RECIPES["hydra++"].num_layers == 4 and RECIPES["hydra++"].teacher_weight == 1.0
    with pytest.raises(ValueError, match="unknown heads kind"):
        recipes_for(["eagle"])


def test_identity_prefix_init_starts_hydra_pp_at_the_base_lm_head(model, data, tmp_path):
    t = Trainer(model, data, config(KINDS, eval_fraction=0.5), tmp_path, progress=False)
    stats = t.evaluate()
    for kind in ("hydra", "hydra++"):  # untrained heads of every kind score the base LM head on h_t
        for a, b in zip(stats["medusa"], stats[kind]):
            assert a["tokens"] == b["tokens"] and a["ce"] == pytest.approx(b["ce"], rel=1e-5)
    copy = HeadRecipe("hydra++", num_layers=4, teacher_weight=1.0, prefix_init="copy")
    t = Trainer(model, data, config(eval_fraction=0.5, recipes=(copy,)), tmp_path / "c", progress=False)
    last = model.model.layers[-1].state_dict()
    assert all(torch.equal(v, last[k]) for k, v in t.sets[0].heads.prefix_layer.state_dict().items())


# ------------------------------------------------------------------------------------------------ loop
def test_training_overfits_a_tiny_set(model, data, tmp_path):
    trainer = Trainer(model, data, config(["hydra"], steps=40), tmp_path, progress=False)
    trainer.eval_idx = trainer.train_idx  # measure on the data it fits
    before = trainer.evaluate()["hydra"]
    summary = trainer.fit()
    after = summary["eval"]["hydra"]
    assert after[0]["top1"] > before[0]["top1"] + 0.2 and after[0]["ce"] < before[0]["ce"] - 1.0
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    losses = [float(r["loss"]) for r in rows if r["split"] == "train" and r["head"] == "0"]
    assert len(losses) == 8 and losses[-1] < losses[0]
    saved = DraftHeads.from_pretrained(tmp_path / "hydra", model, dtype=torch.float32)
    assert next(saved.parameters()).dtype == torch.float32
    assert "| 0 |" in (tmp_path / "hydra" / "README.md").read_text()


def test_teacher_loss_trains_towards_base_distribution(model, data, tmp_path):
    cfg = config(["medusa"], teacher_weight=1.0, steps=25)
    trainer = Trainer(model, data, cfg, tmp_path, progress=False)
    trainer.eval_idx = trainer.train_idx
    before = trainer.evaluate()["medusa"]
    after = trainer.fit()["eval"]["medusa"]
    assert trainer.teacher and all(a["kl"] < 0.7 * b["kl"] for a, b in zip(after, before))


def test_kinds_share_one_base_forward_and_train_independently(model, data, tmp_path):
    calls = []
    hook = model.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        together = Trainer(model, data, config(KINDS, steps=6, grad_accum=2, dropout=0.1), tmp_path / "a",
                           progress=False)
        together.fit()
    finally:
        hook.remove()
    assert len(calls) == 6 * 2  # one base forward per micro-batch for all three kinds
    alone = Trainer(model, data, config(["hydra"], steps=6, grad_accum=2, dropout=0.1), tmp_path / "b",
                    progress=False)
    alone.fit()
    assert_same_params({"hydra": params(together)["hydra"]}, params(alone))


def test_resume_matches_uninterrupted_run(model, data, tmp_path):
    cfg = config(["medusa", "hydra++"], steps=8, grad_accum=2, dropout=0.1, noise=0.05, ckpt_every=0)
    full = Trainer(model, data, cfg, tmp_path / "full", progress=False)
    full.fit()
    first = Trainer(model, data, cfg, tmp_path / "part", progress=False)
    s = first.fit(until=3)
    assert s["step"] == 3 and not s["finished"] and ckpt.exists(tmp_path / "part" / "checkpoint")
    assert not (tmp_path / "part" / "medusa").exists()
    second = Trainer(model, data, cfg, tmp_path / "part", progress=False)
    s = second.fit()
    assert s["step"] == 8 and s["finished"]
    assert_same_params(params(second), params(full))
    for a, b in zip(second.sets, full.sets):
        assert a.optimizer.state_dict()["state"][0]["step"] == b.optimizer.state_dict()["state"][0]["step"]


def test_checkpoint_errors(model, data, data_dir, tmp_path):
    cfg = config(["hydra"], steps=2)
    Trainer(model, data, cfg, tmp_path, progress=False).fit()
    with pytest.raises(ckpt.CheckpointMismatchError, match="trains hydra .* asks for medusa"):
        Trainer(model, data, config(["medusa"], steps=4), tmp_path, progress=False).fit()
    with pytest.raises(ckpt.CheckpointMismatchError, match="trains hydra .4 heads.*asks for hydra .2 heads"):
        Trainer(model, data, config(["hydra"], steps=4, num_heads=2), tmp_path, progress=False).fit()
    other = tiny_llama(seed=3)
    with pytest.raises(ckpt.CheckpointMismatchError, match="another base model .*lm_head"):
        Trainer(other, data, config(["hydra"], steps=4), tmp_path, progress=False).fit()
    state = next((tmp_path / "checkpoint").glob("state*.pt"))  # the file checkpoint.json names
    blob = state.read_bytes()
    state.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ckpt.CheckpointError, match="truncated"):
        Trainer(model, data, config(["hydra"], steps=4), tmp_path, progress=False).fit()
    state.write_bytes(blob[:-8] + b"garbage!")
    with pytest.raises(ckpt.CheckpointError, match="sha256 differs"):
        Trainer(model, data, config(["hydra"], steps=4), tmp_path, progress=False).fit()
    (tmp_path / "checkpoint" / "checkpoint.json").write_text("{")
    with pytest.raises(ckpt.CheckpointError, match="unreadable"):
        Trainer(model, data, config(["hydra"], steps=4), tmp_path, progress=False).fit()


def test_ranks_take_disjoint_slices(model, data, tmp_path):
    t = Trainer(model, data, config(["medusa"], batch_size=3), tmp_path, progress=False)
    n = len(t.train_idx)
    stream = [t.rank_batch_indices(c, 0) for c in range(0, 2 * n, 3)]
    flat = [i for chunk in stream for i in chunk]
    assert sorted(flat[:n]) == sorted(t.train_idx) and sorted(flat[n: 2 * n]) == sorted(t.train_idx)
    assert t.rank_batch_indices(0, 1) == flat[3:6]  # rank 1 takes the slice after rank 0's


def test_ddp_gloo_two_ranks(model_dir, data_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "python"), str(TESTS), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(TESTS / "_train_ddp_worker.py"), str(model_dir), str(data_dir), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)  # a hang guard, not a speed test
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert_same_params(r0["heads"], r1["heads"])
    init = {k: DraftHeads.from_base(tiny_llama(), k).state_dict() for k in ("medusa", "hydra++")}
    assert any(not torch.equal(init["medusa"][n], p) for n, p in r0["heads"]["medusa"].items())
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    for kind in ("medusa", "hydra++"):
        loss = [float(r["loss"]) for r in rows if r["split"] == "train" and r["kind"] == kind and r["head"] == "0"]
        assert len(loss) == 12 and sum(loss[-3:]) < sum(loss[:3])
    assert r0["summary"]["eval"].keys() == {"medusa", "hydra++"}
    assert (tmp_path / "hydra_pp" / "model.safetensors").exists()


# ----------------------------------------------------------------------------------------- commands
def test_cli_data_and_fit(model_dir, tmp_path, capsys):
    common = ["--model", str(model_dir), "--device", "cpu", "--quiet"]
    assert cli.main(["data", *common, "--out", str(tmp_path / "d"), "--source", "builtin:8",
                     "--max-new-tokens", "8", "--gen-batch-size", "4"]) == 0
    assert cli.main(["fit", *common, "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o"),
                     "--kinds", "medusa,hydra", "--steps", "4", "--batch-size", "2", "--log-every", "2"]) == 0
    assert "held-out top-1 per head" in capsys.readouterr().out
    for kind in ("medusa", "hydra"):
        cfg = DraftHeads.from_pretrained(tmp_path / "o" / kind, tiny_llama()).config
        assert cfg.kind == kind and cfg.dtype == "bfloat16"
    other = tmp_path / "other"
    tiny_llama(seed=5).save_pretrained(other)
    char_tokenizer().save_pretrained(other)
    assert cli.main(["fit", "--model", str(other), "--device", "cpu", "--quiet", "--data", str(tmp_path / "d"),
                     "--out", str(tmp_path / "o2")]) == 2
    assert "generated by LlamaForCausalLM" in capsys.readouterr().err


def test_default_heads_pipeline(model_dir, tmp_path, capsys):
    args = ["default-heads", "--model", str(model_dir), "--device", "cpu", "--quiet", "--out", str(tmp_path / "o"),
            "--source", "builtin:12", "--max-new-tokens", "12", "--gen-batch-size", "6", "--shard-size", "6",
            "--batch-size", "4", "--time-budget", "20", "--reserve", "3", "--pack-dir", str(tmp_path / "pack"),
            "--data-workers", "2"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "12 samples" in out  # both workers' shards
    for kind, folder in (("medusa", "medusa"), ("hydra", "hydra"), ("hydra++", "hydra_pp")):
        heads = DraftHeads.from_pretrained(tmp_path / "o" / folder, tiny_llama())
        assert heads.config.kind == kind and heads.config.dtype == "bfloat16" and not heads.config.own_lm_head
        assert kind in out
    # the parts reassemble into the same folders
    parts = sorted((tmp_path / "pack").glob("heads.tar.*"))
    blob = b"".join(p.read_bytes() for p in parts)
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        names = set(tar.getnames())
    assert {"medusa/config.json", "hydra_pp/README.md", "summary.json"} <= names


def test_default_heads_survives_a_failing_kind(model_dir, tmp_path, monkeypatch, capsys):
    real = HeadsObjective.forward

    def broken(self, *a, **k):
        if self.recipe.kind == "hydra":
            raise RuntimeError("simulated out of memory")
        return real(self, *a, **k)

    monkeypatch.setattr(HeadsObjective, "forward", broken)
    args = ["default-heads", "--model", str(model_dir), "--device", "cpu", "--quiet", "--out", str(tmp_path / "o"),
            "--source", "builtin:8", "--max-new-tokens", "8", "--gen-batch-size", "8", "--batch-size", "4",
            "--time-budget", "8", "--reserve", "2", "--steps", "5"]
    assert cli.main(args) == 1
    out = capsys.readouterr().out
    assert "hydra    top-1 per head: -" in out and "FAILED: RuntimeError: simulated out of memory" in out
    assert (tmp_path / "o" / "medusa" / "config.json").exists() and (tmp_path / "o" / "hydra_pp").exists()
    assert not (tmp_path / "o" / "hydra").exists()
    assert math.isfinite(DraftHeads.from_pretrained(tmp_path / "o" / "medusa", tiny_llama())
                         .heads[0].blocks[0].weight.float().sum().item())


def test_cli_data_workers_run_side_by_side(model_dir, tmp_path, capsys):
    """--workers 2 starts a second process; together they write the files of a one-process build."""
    common = ["data", "--model", str(model_dir), "--device", "cpu", "--quiet", "--source", "builtin:8",
              "--max-new-tokens", "6", "--gen-batch-size", "2", "--shard-size", "2"]
    assert cli.main([*common, "--out", str(tmp_path / "one")]) == 0
    assert cli.main([*common, "--out", str(tmp_path / "two"), "--workers", "2"]) == 0
    assert "8 samples in 4 shards" in capsys.readouterr().out.splitlines()[-1]
    from hydra_fast.train.dataset import read_manifest

    a, b = read_manifest(tmp_path / "one"), read_manifest(tmp_path / "two")
    assert b["complete"] and {k: v["sha256"] for k, v in a["shards"].items()} == \
        {k: v["sha256"] for k, v in b["shards"].items()}
    assert cli.main([*common, "--out", str(tmp_path / "three"), "--workers", "2", "--worker", "2"]) == 2
    assert "--worker 2 is not in 0..1" in capsys.readouterr().err


def test_train_samples_subset_and_per_recipe_weight_decay(model, data, tmp_path):
    import dataclasses

    full = Trainer(model, data, config(eval_fraction=0.2), tmp_path / "a", progress=False)
    sub = Trainer(model, data, config(eval_fraction=0.2, train_samples=5), tmp_path / "b", progress=False)
    assert sub.eval_idx == full.eval_idx and len(sub.train_idx) == 5 and set(sub.train_idx) <= set(full.train_idx)
    again = Trainer(model, data, config(eval_fraction=0.2, train_samples=5), tmp_path / "c", progress=False)
    assert again.train_idx == sub.train_idx  # seeded
    with pytest.raises(ValueError, match="train_samples=99 but the data has only"):
        Trainer(model, data, config(eval_fraction=0.2, train_samples=99), tmp_path / "d", progress=False)
    recipes = (RECIPES["medusa"], dataclasses.replace(RECIPES["hydra"], weight_decay=0.1))
    t = Trainer(model, data, TrainConfig(recipes=recipes, weight_decay=0.01, steps=1), tmp_path / "e", progress=False)
    assert [s.optimizer.param_groups[0]["weight_decay"] for s in t.sets] == [0.01, 0.1]
    args = cli.parser().parse_args(["fit", "--data", "d", "--out", "o", "--kinds", "medusa,hydra",
                                    "--weight-decay", "0.2", "--train-samples", "7"])
    tc = cli.train_config(args, ["medusa", "hydra"])
    assert [r.weight_decay for r in tc.recipes] == [0.2, 0.2] and tc.train_samples == 7


@pytest.fixture(scope="module")
def cached_data(tmp_path_factory, model):
    """The data of data_dir again, with the base's hidden states and its full distribution (k = V) cached."""
    d = tmp_path_factory.mktemp("cached")
    build(model, char_tokenizer(), d, BuildConfig(sources=("builtin:16",), max_new_tokens=16, batch_size=8,
                                                   shard_size=8, cache_hidden=True, cache_top_k=128),
          progress=False)
    return SelfDistillData(d, model)


def test_sparse_kl_is_kl_of_the_renormalised_top_k():
    from hydra_fast.train.losses import sparse_kl

    torch.manual_seed(0)
    logp = torch.log_softmax(torch.randn(6, 20), -1)
    teacher = torch.log_softmax(torch.randn(6, 20) * 2, -1)
    v, j = teacher.topk(20, -1)  # k = V: the exact KL
    torch.testing.assert_close(sparse_kl(logp, j, v), F.kl_div(logp, teacher, log_target=True, reduction="sum"))
    v, j = teacher.topk(4, -1)
    renorm = torch.full_like(teacher, float("-inf")).scatter(-1, j, v - torch.logsumexp(v, -1, keepdim=True))
    expect = (renorm.exp() * (renorm.clamp_min(-1e30) - logp)).sum()
    torch.testing.assert_close(sparse_kl(logp, j, v), expect)
    v[:, -1] = float("-inf")  # an empty slot adds nothing
    assert torch.isfinite(sparse_kl(logp, j, v))


def test_cached_data_trains_without_the_base_forward(model, data, cached_data, tmp_path, monkeypatch):
    kinds = ("medusa", "hydra++")  # CE and teacher loss
    plain = Trainer(model, data, config(kinds, eval_fraction=0.2), tmp_path / "a", progress=False)
    fast = Trainer(model, cached_data, config(kinds, eval_fraction=0.2), tmp_path / "b", progress=False)
    assert fast.cached_hidden and fast.cached_top_k == 128 and not plain.cached_hidden
    picks = plain.rank_batch_indices(0, 0)
    losses = {}
    for name, t in (("plain", plain), ("fast", fast)):
        batch = t._collate(picks)
        if name == "fast":  # no base forward: the cached hidden states stand in for it
            monkeypatch.setattr(t.decoder, "forward", lambda *a, **k: pytest.fail("base forward ran"))
        hidden, pe, targets = t._base_forward(batch, t.teacher)
        # and the cached top-k for the teacher's full distribution from the LM head
        assert (targets.teacher_top is not None, targets.teacher_logp is None) == ((name == "fast",) * 2)
        for s in t.sets:
            s.objective.eval()
            losses[name, s.recipe.kind] = t._run_set(s, batch, hidden, pe, targets, train=False)
    for kind in kinds:  # same loss and statistics; bf16 hidden states and fp16 log-probabilities in the cache
        torch.testing.assert_close(losses["fast", kind][0], losses["plain", kind][0], rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(losses["fast", kind][1][:, 4], losses["plain", kind][1][:, 4])  # token counts
    # the loop runs on it, and --no-cache goes back to the base
    fast.fit(resume=False)
    assert (tmp_path / "b" / "hydra_pp" / "README.md").read_text().count("hidden states cached by the data build")
    off = Trainer(model, cached_data, config(kinds, use_cache=False), tmp_path / "c", progress=False)
    assert not off.cached_hidden and off.cached_top_k == 0 and off._collate(picks).hidden is None


def test_cli_cached_data_with_workers_then_fit(model_dir, tmp_path, capsys):
    common = ["--model", str(model_dir), "--device", "cpu", "--quiet"]
    assert cli.main(["data", *common, "--out", str(tmp_path / "d"), "--source", "builtin:6", "--max-new-tokens", "6",
                     "--gen-batch-size", "3", "--shard-size", "3", "--cache-hidden", "--cache-top-k", "4",
                     "--workers", "2"]) == 0
    data = SelfDistillData(tmp_path / "d", tiny_llama())
    assert len(data) == 6 and data.has_hidden and data.top_k == 4
    assert cli.main(["fit", *common, "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o"), "--kinds",
                     "hydra++", "--steps", "3", "--batch-size", "2"]) == 0
    card = (tmp_path / "o" / "hydra_pp" / "README.md").read_text()
    assert "hidden states cached by the data build; teacher = the cached top-4 log-probabilities" in card

"""The command lines: ordinary mistakes are one clear line and a non-zero exit; chat survives Ctrl-C and a
history that outgrows the cache; training skips non-finite updates and never saves NaN heads."""
from __future__ import annotations

import builtins

import pytest
import torch
from _train_tiny import char_tokenizer, tiny_llama

from hydra_fast import cli


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from hydra_fast.heads import DraftHeads

    d = tmp_path_factory.mktemp("model")
    base = tiny_llama(vocab=128)
    base.save_pretrained(d)
    char_tokenizer().save_pretrained(d)
    DraftHeads.from_base(base, "hydra").save_pretrained(d.parent / f"{d.name}_heads")
    return d


def run_cli(argv, capsys):
    code = cli.main(argv)
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("extra, message", [
    (["--heads", "/no/such/heads"], "--heads /no/such/heads: no such folder"),
    (["--heads", "HEADS", "--tree", "no_such_tree"], "no_such_tree"),
    (["--heads", "HEADS", "--tree", "/no/such/tree.json"], "tree.json"),
    (["--device", "tpu9"], "--device"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
])
def test_generate_mistakes_are_one_line(model_dir, capsys, extra, message):
    heads = str(model_dir.parent / f"{model_dir.name}_heads")
    argv = ["generate", "hi", "--model", str(model_dir), "--heads", "none", "--device", "cpu",
            *[heads if a == "HEADS" else a for a in extra]]
    code, err = run_cli(argv, capsys)
    assert code == 2 and message in err and "Traceback" not in err
    ours = [line for line in err.splitlines() if "hydra-fast" in line]  # (HF may draw a loading bar too)
    assert len(ours) == 1 and ours[0].startswith("hydra-fast: error:") and message in ours[0]


def test_missing_model_folder_and_cuda_without_cuda(tmp_path, capsys):
    code, err = run_cli(["generate", "hi", "--model", str(tmp_path / "nope"), "--device", "cpu"], capsys)
    assert code == 2 and "--model" in err and "no such folder" in err
    if not torch.cuda.is_available():
        code, err = run_cli(["generate", "hi", "--model", str(tmp_path), "--device", "cuda"], capsys)
        assert code == 2 and "--device cpu" in err and "Traceback" not in err


def test_chat_survives_ctrl_c_and_trims_history(model_dir, capsys, monkeypatch):
    lines = iter([KeyboardInterrupt(), "a" * 40, "b" * 40, "c" * 40, "d" * 400, "e", EOFError()])

    def fake_input(prompt=""):
        item = next(lines)
        if isinstance(item, BaseException):
            raise item
        return item
    monkeypatch.setattr(builtins, "input", fake_input)
    argv = ["chat", "--model", str(model_dir), "--heads", "none", "--device", "cpu", "--max-cache-len", "160",
            "--max-new-tokens", "16"]
    code, err = run_cli(argv, capsys)
    assert code == 0
    assert err.count("tok/s") == 4  # a, b, c and e answered; d alone is over the cache
    assert "earliest turn dropped" in err and "too long" in err


def test_training_skips_non_finite_updates_and_never_saves_nan(tmp_path, monkeypatch):
    from hydra_fast.train.config import TrainConfig, recipes_for
    from hydra_fast.train.selfdistill import BuildConfig, build
    from hydra_fast.train.dataset import SelfDistillData
    from hydra_fast.train.trainer import MAX_NONFINITE, Trainer

    base = tiny_llama()
    build(base, char_tokenizer(), tmp_path / "data", BuildConfig(sources=("builtin:4",), max_new_tokens=8,
                                                                  batch_size=4, shard_size=4), progress=False)
    data = SelfDistillData(tmp_path / "data", base)
    cfg = TrainConfig(recipes=recipes_for(["medusa"], lr=1e-2), steps=MAX_NONFINITE + 5, batch_size=2,
                      log_every=0, ckpt_every=0, eval_fraction=0.0)
    trainer = Trainer(base, data, cfg, tmp_path / "out", progress=False)
    poisoned = {"n": 0}
    real = trainer._run_set

    def nan_loss(s, *a, **k):  # the first two steps and then every step: a non-finite loss
        poisoned["n"] += 1
        loss, stats = real(s, *a, **k)
        if poisoned["n"] not in (3, 4):
            for p in s.objective.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
        return loss, stats
    monkeypatch.setattr(trainer, "_run_set", nan_loss)
    summary = trainer.fit(resume=False)
    heads = trainer.sets[0].heads
    assert all(bool(torch.isfinite(p).all()) for p in heads.parameters())
    assert "non-finite" in summary["failed"]["medusa"]
    assert not (tmp_path / "out" / "medusa").exists()

"""The command line end to end (``hydra-fast generate``, ``chat``, ``calibrate``) on a tiny offline model.

A tiny random Llama with a character tokenizer and a chat template (tests/_train_tiny.py), Hydra heads saved to
a folder: what a user's model folder and heads folder look like, without a download.
"""
from __future__ import annotations

import json
import re

import pytest
import torch

from _train_tiny import char_tokenizer, tiny_llama
from hydra_fast import cli
from hydra_fast.heads import DraftHeads
from hydra_fast.tree_search import load_tree


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    base = tiny_llama(vocab=128, seed=3)
    base.save_pretrained(root / "model")
    tok = char_tokenizer()
    tok.save_pretrained(root / "model")
    DraftHeads.from_base(base, "hydra").save_pretrained(root / "heads")
    return root / "model", root / "heads", base, tok


def hf_answer(base, tok, messages, n) -> str:
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    out = base.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def common(folders, n):
    model, heads, _, _ = folders
    return ["--model", str(model), "--heads", str(heads), "--device", "cpu", "--max-new-tokens", str(n),
            "--max-cache-len", "512", "--tree", "tiny"]


def test_generate_streams_hf_greedy_text_and_reports_speed(folders, capsys):
    _, _, base, tok = folders
    assert cli.main(["generate", "Say hello.", *common(folders, 24)]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == hf_answer(base, tok, [{"role": "user", "content": "Say hello."}], 24).strip()
    stats = re.search(r"\[(\d+) tokens in [\d.]+ s: [\d.]+ tok/s, hydra heads, mean accepted length ([\d.]+)\]", err)
    assert stats, err
    assert 1 <= int(stats.group(1)) <= 24 and float(stats.group(2)) >= 1.0


def test_chat_keeps_the_history(folders, capsys, monkeypatch):
    _, _, base, tok = folders
    lines = iter(["Hi.", "And then?", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert cli.main(["chat", *common(folders, 10)]) == 0
    out, err = capsys.readouterr()
    first = hf_answer(base, tok, [{"role": "user", "content": "Hi."}], 10)
    history = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": first},
               {"role": "user", "content": "And then?"}]
    second = hf_answer(base, tok, history, 10)
    assert out == first + "\n" + second + "\n", (out, first, second)
    assert err.count("mean accepted length") == 2


def test_calibrate_writes_a_tree_that_generate_uses(folders, tmp_path, capsys):
    model, heads, base, tok = folders
    tree_file = tmp_path / "tree.json"
    assert cli.main(["calibrate", "--model", str(model), "--heads", str(heads), "--out", str(tree_file),
                     "--prompts", "2", "--max-new-tokens", "12", "--device", "cpu", "--max-cache-len", "256"]) == 0
    out, _ = capsys.readouterr()
    assert re.search(r"\d+-node tree: [\d.]+ tokens/step in [\d.]+ ms .* on cpu -> ", out), out
    saved = json.loads(tree_file.read_text())
    assert saved  # the file records the choice; load_tree reads it back as rank lists
    choices = load_tree(tree_file)
    assert all(all(isinstance(r, int) and r >= 0 for r in node) for node in choices)
    args = ["generate", "Say hello.", *common(folders, 16)]
    args[args.index("--tree") + 1] = str(tree_file)
    assert cli.main(args) == 0
    out, _ = capsys.readouterr()
    assert out.strip() == hf_answer(base, tok, [{"role": "user", "content": "Say hello."}], 16).strip()


def test_calibrate_weighs_dynamic_trees_when_asked(folders, tmp_path, capsys):
    model, heads, _, _ = folders
    tree_file = tmp_path / "tree.json"
    args = ["calibrate", "--model", str(model), "--heads", str(heads), "--out", str(tree_file), "--prompts", "1",
            "--max-new-tokens", "8", "--device", "cpu", "--max-cache-len", "256", "--dynamic"]
    specs = "dynamic:nodes=4,depth=2,topk=2,width=2,dynamic:nodes=6,depth=2,topk=3,width=2"
    assert cli.main(args + [specs]) == 0
    _, err = capsys.readouterr()
    assert "(dynamic:nodes=4,depth=2,topk=2,width=2)" in err and "(dynamic:nodes=6,depth=2,topk=3,width=2)" in err
    saved = json.loads(tree_file.read_text())
    assert sum(1 for c in saved["candidates"] if c.get("dynamic")) == 2
    assert cli.main(args + ["dynamic:nodes=4,width=9"]) != 0
    _, err = capsys.readouterr()
    assert "width (9) cannot exceed topk (8)" in err

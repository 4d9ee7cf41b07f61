"""Saves that a crash cannot half-do, folders that are not ours left alone, dtype-stable base fingerprints,
and kernels used only on the architectures they were built for."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from _train_tiny import tiny_llama

from hydra_fast import ops, safe_io
from hydra_fast.heads import DraftHeads, HeadsCheckpointError, check_compatible, fingerprint
from hydra_fast.train import checkpoint as ckpt

EXPECT = {"heads": {"hydra": {"num_heads": 4, "num_layers": 1, "own_lm_head": False}},
          "base": {"architecture": "LlamaForCausalLM", "model_type": "llama", "hidden_size": 64,
                   "vocab_size": 128, "lm_head_digest": "d"},
          "data": "x"}


def test_checkpoint_survives_a_crash_before_its_json(tmp_path, monkeypatch):
    ckpt.save(tmp_path, {"step": 1}, {**EXPECT, "step": 1})

    def crash(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(ckpt, "write_json_atomic", crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(tmp_path, {"step": 2}, {**EXPECT, "step": 2})
    monkeypatch.undo()
    assert ckpt.load(tmp_path, EXPECT)["step"] == 1  # the previous checkpoint, whole
    ckpt.save(tmp_path, {"step": 3}, {**EXPECT, "step": 3})
    assert ckpt.load(tmp_path, EXPECT)["step"] == 3
    assert len(list(tmp_path.glob("state*.pt"))) == 1  # old state files are cleaned up


def test_heads_save_refuses_a_model_folder(tmp_path):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "model")
    before = sorted(p.name for p in (tmp_path / "model").iterdir())
    heads = DraftHeads.from_base(base, "hydra")
    with pytest.raises(HeadsCheckpointError, match="not a heads config"):
        heads.save_pretrained(tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == before
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(HeadsCheckpointError, match="weights that are not heads"):
        heads.save_pretrained(tmp_path / "weights")


def test_heads_resave_is_whole_and_keeps_other_files(tmp_path, monkeypatch):
    base = tiny_llama()
    heads = DraftHeads.from_base(base, "hydra")
    heads.save_pretrained(tmp_path / "h", max_shard_size="20KB")
    (tmp_path / "h" / "README.md").write_text("card")
    (tmp_path / "h" / "tree_cpu.json").write_text("[[0]]")
    with torch.no_grad():
        heads.heads[0].blocks[0].bias.fill_(0.5)
    real = safe_io.swap_in_folder

    def crash(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(safe_io, "swap_in_folder", crash)
    with pytest.raises(KeyboardInterrupt):
        heads.save_pretrained(tmp_path / "h")
    loaded = DraftHeads.from_pretrained(tmp_path / "h", base)  # the old heads, whole
    assert float(loaded.heads[0].blocks[0].bias.detach().abs().max()) == 0.0
    monkeypatch.setattr(safe_io, "swap_in_folder", real)
    heads.save_pretrained(tmp_path / "h")  # one file now: stale shards must not shadow it
    loaded = DraftHeads.from_pretrained(tmp_path / "h", base)
    assert torch.equal(loaded.heads[0].blocks[0].bias, heads.heads[0].blocks[0].bias)
    names = sorted(p.name for p in (tmp_path / "h").iterdir())
    assert names == ["README.md", "config.json", "model.safetensors", "tree_cpu.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h"]  # no temporary folders left


def test_tree_file_save_is_atomic(tmp_path, monkeypatch):
    from hydra_fast.tree_search import TreeChoice, load_tree

    choice = TreeChoice(tree=[[0], [1]], expected_tokens=1.5, step_ms=2.0, device="cpu")
    path = tmp_path / "tree.json"
    choice.save(path)
    monkeypatch.setattr(json, "dumps", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        choice.save(path)
    monkeypatch.undo()
    assert load_tree(path) == [[0], [1]] and sorted(p.name for p in tmp_path.iterdir()) == ["tree.json"]


def test_default_model_conversion_is_locked_and_marked_complete(tmp_path, monkeypatch):
    from hydra_fast import hub

    monkeypatch.setenv("HYDRA_FAST_CACHE", str(tmp_path))
    out = tmp_path / hub.DEFAULT_MODEL
    out.mkdir()
    (out / "config.json").write_text("{}")  # a conversion cut short: no COMPLETE marker
    (out / "model.safetensors").write_bytes(b"")
    calls = []

    def convert(src, dest):
        calls.append(dest)
        new = safe_io.new_folder_beside(dest)
        (new / "config.json").write_text('{"ok": 1}')
        (new / hub.COMPLETE).write_text("x")
        safe_io.swap_in_folder(new, dest)
        return dest
    monkeypatch.setattr(hub, "convert_gguf", convert)
    assert hub.default_model_path(gguf=tmp_path / "x.gguf") == out and len(calls) == 1
    assert json.loads((out / "config.json").read_text()) == {"ok": 1}
    assert hub.default_model_path(gguf=tmp_path / "x.gguf") == out and len(calls) == 1  # done: not again


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fingerprint_is_dtype_stable(dtype):
    base = tiny_llama()
    heads = DraftHeads.from_base(base, "hydra")
    fp32 = fingerprint(base)
    low = fingerprint(base.to(dtype))
    assert fp32.differences(low) == []
    check_compatible(heads, base)  # heads made from the fp32 copy accept the low-precision one
    other = fingerprint(tiny_llama(seed=1))
    assert fp32.differences(other) == ["lm_head_sketch"]


def test_fingerprint_of_heads_saved_without_a_sketch():
    base = tiny_llama()
    fp = fingerprint(base)
    old = type(fp)(**{**fp.__dict__, "lm_head_sketch": ()})
    assert old.differences(fp) == []
    assert type(fp)(**{**old.__dict__, "lm_head_digest": "0" * 64}).differences(fp) == ["lm_head_digest"]


@pytest.mark.parametrize("built, arch, ok", [("90", "90", True), ("80,90", "80", True), ("90a", "90", True),
                                             ("90-real", "90", True), ("90", "80", False), ("90", "100", False)])
def test_kernels_only_for_the_built_architectures(built, arch, ok):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ops._built_for_arch(arch, built) is ok
    assert len(caught) == (0 if ok else 1)
    if not ok:
        assert f"sm_{arch}" in str(caught[0].message) and "HYDRA_FAST_CUDA_ARCHS" in str(caught[0].message)


def test_has_kernels_false_on_another_gpu(monkeypatch):
    class FakeExtension:
        @staticmethod
        def build_info():
            return {"cuda": True, "cuda_archs": "90"}
    monkeypatch.setattr(ops, "_extension", lambda: FakeExtension)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.warns(UserWarning, match="sm_80"):
        assert ops.has_kernels("cuda") is False
    assert ops.implementation("cpu") is ops._Kernels
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert ops.has_kernels("cuda") is True

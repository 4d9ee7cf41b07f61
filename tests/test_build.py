"""The build: what was compiled is reported, and impossible requests fail with a clear message."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hydra_fast

ROOT = Path(__file__).resolve().parents[1]


def _setup(env_extra: dict, tmp_path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HYDRA_FAST_BUILD_DIR=str(tmp_path / "build"), **env_extra)
    return subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "-b", str(tmp_path / "lib"),
                           "-t", str(tmp_path / "tmp")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)  # a hang guard: cmake under load can take minutes


def test_build_info_describes_this_build():
    info = hydra_fast.build_info()
    assert info["extension"] is True
    if torch.version.cuda is None:  # auto mode never builds CUDA kernels against a CPU-only torch
        assert info["cuda"] is False and info["cuda_archs"] == ""
    else:
        assert info["cuda"] is True and "90" in info["cuda_archs"].split(",")
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    assert info["cxx_standard"] >= 202002


def test_every_op_has_a_cpu_kernel():
    # a missing CPU kernel must fail here, not turn the op's tests into skips
    assert hydra_fast.build_info()["extension"] is True, "hydra_fast._C is not built"
    names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("hydra_fast::"))
    assert len(names) >= 5, names  # tree_attention, draft_head_mlp, accept_greedy, accept_typical, kv_compact
    missing = [n for n in names if not torch._C._dispatch_has_kernel_for_dispatch_key(n, "CPU")]
    assert not missing, f"ops without a CPU kernel: {missing}"


def test_the_extension_has_every_op_the_package_calls():
    assert hydra_fast.build_info()["extension"] is True, "hydra_fast._C is not built"
    from hydra_fast import ops

    assert ops.stale_reason() is None
    # an extension built from older sources (an op missing) is named stale, with the command that fixes it
    reason = ops.stale_reason(ops.OP_NAMES + ("an_op_from_newer_sources",))
    assert "lacks the op(s) an_op_from_newer_sources" in reason and "pip install --no-build-isolation -e ." in reason


def test_a_stale_extension_falls_back_to_the_reference_ops_with_a_warning():
    # a fresh interpreter where the loaded extension lacks an op the package calls: no crash at import, a warning,
    # and the reference ops serve every device
    code = (
        "import warnings, torch\n"
        "real = torch._ops._OpNamespace.__getattr__\n"
        "def hide(self, name):\n"
        "    if name == 'dynamic_tree_layout': raise AttributeError(name)\n"
        "    return real(self, name)\n"
        "torch._ops._OpNamespace.__getattr__ = hide\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    from hydra_fast import ops, reference\n"
        "assert any('lacks the op(s) dynamic_tree_layout' in str(x.message) for x in w), [str(x.message) for x in w]\n"
        "assert ops.implementation('cpu') is reference and not ops.build_info()['extension']\n"
        "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(Path(hydra_fast.__file__).parents[1])))
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


@pytest.mark.skipif(torch.version.cuda is not None, reason="this torch has CUDA: forcing it is possible")
def test_forcing_cuda_with_a_cpu_torch_is_a_clear_error(tmp_path):
    proc = _setup({"HYDRA_FAST_CUDA": "1"}, tmp_path)
    assert proc.returncode != 0
    assert "CPU-only build" in proc.stderr and "HYDRA_FAST_CUDA" in proc.stderr


def test_unknown_cuda_flag_is_a_clear_error(tmp_path):
    proc = _setup({"HYDRA_FAST_CUDA": "maybe"}, tmp_path)
    assert proc.returncode != 0 and "HYDRA_FAST_CUDA must be auto, 0 or 1" in proc.stderr


def test_missing_torch_is_a_clear_error(tmp_path):
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "torch.py").write_text("raise ImportError('no torch here')\n")
    proc = _setup({"PYTHONPATH": str(fake)}, tmp_path)
    assert proc.returncode != 0
    assert "torch is not installed" in proc.stderr and "pip install torch" in proc.stderr

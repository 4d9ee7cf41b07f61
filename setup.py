"""Drives CMakeLists.txt to build hydra_fast._C against the torch that is already installed.

Install with ``pip install --no-build-isolation -e .`` so the extension links the torch in this environment.

Environment:
  HYDRA_FAST_CUDA       auto (default): build CUDA kernels iff the installed torch is a CUDA build;
                        1: require them (error if torch has no CUDA or nvcc is missing); 0: never.
  HYDRA_FAST_CUDA_ARCHS CUDA architectures for CMake (default "90", the H200).
  MAX_JOBS              parallel compile jobs (default: all cores).
  HYDRA_FAST_BUILD_DIR  CMake build directory (default: setuptools' build_temp).
"""
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _torch():
    try:
        import torch  # noqa: F401
    except ImportError:
        sys.exit(
            "hydra_fast: torch is not installed. Install it first (e.g. `pip install torch==2.13.0`), then "
            "`pip install --no-build-isolation -e .` so the extension builds against it."
        )
    import torch

    return torch


def _want_cuda(torch) -> bool:
    flag = os.environ.get("HYDRA_FAST_CUDA", "auto").strip().lower()
    if flag in ("0", "off", "false", "no"):
        return False
    has_torch_cuda = torch.version.cuda is not None
    if flag in ("1", "on", "true", "yes"):
        if not has_torch_cuda:
            sys.exit(
                f"hydra_fast: HYDRA_FAST_CUDA=1 but the installed torch {torch.__version__} is a CPU-only build. "
                "Install a CUDA build of torch or unset HYDRA_FAST_CUDA."
            )
        if shutil.which("nvcc") is None and not os.environ.get("CUDACXX"):
            sys.exit("hydra_fast: HYDRA_FAST_CUDA=1 but nvcc is not on the PATH (set CUDACXX or add CUDA's bin).")
        return True
    if flag != "auto":
        sys.exit(f"hydra_fast: HYDRA_FAST_CUDA must be auto, 0 or 1, not {flag!r}")
    # nvcc is present on CPU-only machines too; only the installed torch decides.
    return has_torch_cuda and (shutil.which("nvcc") is not None or bool(os.environ.get("CUDACXX")))


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        torch = _torch()
        from torch.utils import cpp_extension
        import pybind11

        with_cuda = _want_cuda(torch)
        out_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_root = os.environ.get("HYDRA_FAST_BUILD_DIR") or self.build_temp
        build_dir = Path(build_root).resolve() / ("cuda" if with_cuda else "cpu")
        build_dir.mkdir(parents=True, exist_ok=True)
        includes = cpp_extension.include_paths(device_type="cuda" if with_cuda else "cpu")
        lib_dir = cpp_extension.library_paths()[0]
        cfg = [
            "cmake", str(ROOT), "-G", "Ninja",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('HYDRA_FAST_BUILD_TYPE', 'Release')}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DTORCH_INCLUDE_DIRS={';'.join(includes)}",
            f"-DTORCH_LIBRARY_DIR={lib_dir}",
            f"-DTORCH_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            f"-DTORCH_VERSION={torch.__version__}",
            f"-DHYDRA_FAST_WITH_CUDA={'ON' if with_cuda else 'OFF'}",
            f"-DHYDRA_FAST_CUDA_ARCHS={os.environ.get('HYDRA_FAST_CUDA_ARCHS', '90')}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_path.parent}",
            f"-DPYTHON_MODULE_EXTENSION={sysconfig.get_config_var('EXT_SUFFIX')}",
        ]
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run(cfg, cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "-j", jobs], cwd=build_dir, check=True)
        built = next(out_path.parent.glob("_C*.so"), None)
        if built is None:
            sys.exit(f"hydra_fast: CMake finished but no _C*.so appeared in {out_path.parent}")
        if built.resolve() != out_path:
            shutil.move(str(built), out_path)


setup(
    ext_modules=[Extension("hydra_fast._C", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
)

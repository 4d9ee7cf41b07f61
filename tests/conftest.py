"""Shared test fixtures: the device list, the one tolerance table, seeded random inputs, random draft trees."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from hydra_fast import ops


def cuda_ready() -> bool:
    return torch.cuda.is_available() and ops.has_kernels("cuda")


# cpu always; cuda on the GPU machine (marked, so `-m cuda` / `-m "not cuda"` select it).
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[
        pytest.mark.cuda,
        pytest.mark.skipif(not cuda_ready(), reason="needs a CUDA device and hydra_fast._C built with CUDA"),
    ]),
]

DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16"),
]

needs_extension = pytest.mark.skipif(not ops.extension_loaded(), reason="hydra_fast._C is not built")


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


def require_kernel(op: str, device) -> None:
    """Fail where a build that has the extension lacks hydra_fast::op's CPU kernel (every op must have one);
    skip, with the reason in the report, where its CUDA kernel is missing."""
    key = "CUDA" if torch.device(device).type == "cuda" else "CPU"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"hydra_fast::{op}", key):
        if key == "CPU" and ops.extension_loaded():
            pytest.fail(f"hydra_fast._C is built but registers no CPU kernel for hydra_fast::{op}: add "
                        f"csrc/cpu/{op}.cpp (TORCH_LIBRARY_IMPL(hydra_fast, CPU, m)) and list it in CMakeLists.txt")
        pytest.skip(f"no {key} kernel registered for hydra_fast::{op}")


@dataclass(frozen=True)
class Tol:
    atol: float
    rtol: float


# The one tolerance table. Attention and the draft MLP use it as the additive slack of the flash-attention rule
# (kernel error vs fp32 <= 2x the error of plain PyTorch in the low dtype + atol); elementwise comparisons use
# both fields.
TOL = {
    torch.float32: Tol(atol=1e-5, rtol=1e-5),
    torch.float16: Tol(atol=1e-3, rtol=1e-3),
    torch.bfloat16: Tol(atol=8e-3, rtol=1.6e-2),
}


def assert_close_by_dtype(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None):
    tol = TOL[dtype or actual.dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol.atol, rtol=tol.rtol)


def assert_within_lowp_error(out: torch.Tensor, ref_fp32: torch.Tensor, ref_lowp: torch.Tensor, dtype):
    """flash-attention's rule: |out - ref_fp32| <= 2 |ref_lowp - ref_fp32| + atol, as max-abs errors."""
    err = (out.float() - ref_fp32.float()).abs().max().item()
    base = (ref_lowp.float() - ref_fp32.float()).abs().max().item()
    bound = 2 * base + TOL[dtype].atol
    assert err <= bound, f"kernel error {err:.3g} > 2 x plain {dtype} error {base:.3g} + atol {TOL[dtype].atol}"


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(shape, dtype, device, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """Seeded normal values drawn on the CPU (identical on every device), then moved."""
    return (torch.randn(shape, generator=gen) * scale).to(dtype=dtype, device=device)


def noncontiguous(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """A non-contiguous copy of t (same values): every other slice along `dim` of a buffer twice as long.

    `dim` must not be the last one, so the last dim keeps stride 1 as the kernels require.
    """
    dim = dim % t.dim()
    assert dim != t.dim() - 1 and t.shape[dim] > 1, "pick a non-last dim of size > 1"
    shape = list(t.shape)
    shape[dim] *= 2
    buf = torch.full(shape, float("nan") if t.is_floating_point() else -7, dtype=t.dtype, device=t.device)
    view = buf.unflatten(dim, (t.shape[dim], 2)).select(dim + 1, 0)
    view.copy_(t)
    assert not view.is_contiguous() and view.stride(-1) == 1
    return view


@dataclass(frozen=True)
class RandomTree:
    parents: list[int]  # [N], -1 for the root; parent index < child index
    paths: torch.Tensor  # int64 [P, L], root-to-leaf, -1 padded, leaves in increasing order
    mask: torch.Tensor  # bool [N, N], ancestors and self


def random_tree(num_nodes: int, gen: torch.Generator, max_depth: int = 6) -> RandomTree:
    """A random draft tree with parent[i] < i (so a node's index is at least its depth)."""
    parents, depth = [-1], [0]
    for i in range(1, num_nodes):
        while True:
            p = int(torch.randint(0, i, (1,), generator=gen))
            if depth[p] < max_depth:
                break
        parents.append(p)
        depth.append(depth[p] + 1)
    leaves = [i for i in range(num_nodes) if i not in set(parents)]
    rows = []
    for leaf in leaves:
        path, n = [], leaf
        while n >= 0:
            path.append(n)
            n = parents[n]
        rows.append(path[::-1])
    L = max(len(r) for r in rows)
    paths = torch.tensor([r + [-1] * (L - len(r)) for r in rows], dtype=torch.long)
    mask = torch.zeros(num_nodes, num_nodes, dtype=torch.bool)
    for i in range(num_nodes):
        n = i
        while n >= 0:
            mask[i, n] = True
            n = parents[n]
    return RandomTree(parents, paths, mask)


def _clone_args(args):
    return [a.clone() if isinstance(a, torch.Tensor) else [x.clone() for x in a] if isinstance(a, list) else a
            for a in args]


def replay_cuda_graph(fn, static: list, fresh: list):
    """Capture fn(*static) in a CUDA graph (after two warm-up calls on a side stream), refill the captured input
    buffers with `fresh`'s values, replay. Returns (graph output, eager output, static args after the replay,
    eager args): for an op that mutates its inputs, the last two must match as well."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn(*_clone_args(static))
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn(*static)
    for dst, src in zip(static, fresh):
        if isinstance(dst, torch.Tensor):
            dst.copy_(src)
        elif isinstance(dst, list):
            for d, s in zip(dst, src):
                d.copy_(s)
    want_args = _clone_args(static)
    want = fn(*want_args)
    graph.replay()
    torch.cuda.synchronize()
    return static_out, want, static, want_args


def assert_op_refuses(device, op: str, args, match: str) -> None:
    """hydra_fast op `op` on `device` raises a RuntimeError matching `match` for `args` (CPU tensors, moved)."""
    require_kernel(op, device)
    args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    with pytest.raises(RuntimeError, match=match):
        getattr(ops, op)(*args)


def assert_names_cpu_argument(fn, args, index: int, name: str) -> None:
    """fn(*args) with argument `index` moved to the CPU (the rest on CUDA) is a RuntimeError that names it."""
    args = list(args)
    args[index] = args[index].cpu()
    with pytest.raises(RuntimeError, match=name):
        fn(*args)

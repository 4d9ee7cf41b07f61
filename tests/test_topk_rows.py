"""topk_rows: each row's k largest values and their indices, against its pure-PyTorch twin (a stable descending
sort), exactly: the same indices and the same value bits.

A hand-built row with ties, NaNs, infinities and signed zeros; then random rows over dtypes, the draft heads'
widths (6,592 compact and 49,152 full vocabulary logits), odd widths, k from 1 to V (past the CUDA kernel's 32:
the sort path), values on a few levels (many ties), special floats, leading dims, strided and transposed inputs;
opcheck, torch.compile(fullgraph=True), CUDA-graph replay with new inputs, and bad inputs refused.
"""
from __future__ import annotations

import zlib

import pytest
import torch

from conftest import DTYPES, generator, needs_extension, noncontiguous, replay_cuda_graph, require_kernel
from hydra_fast import ops, reference

pytestmark = needs_extension

BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def seed_of(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def rows(shape, dtype, device, seed: int, mode: str = "random") -> torch.Tensor:
    """x [*shape] drawn on the CPU. mode "ties": values on 5 levels; "special": normal values with NaN, +-inf
    and -0.0 sprinkled in (a few percent each)."""
    gen = generator(seed)
    x = torch.randn(shape, generator=gen)
    if mode == "ties":
        x = torch.randint(-2, 3, shape, generator=gen).float()
    elif mode == "special":
        pick = torch.rand(shape, generator=gen)
        x = torch.where(pick < 0.03, float("nan"), x)
        x = torch.where((pick >= 0.03) & (pick < 0.06), float("-inf"), x)
        x = torch.where((pick >= 0.06) & (pick < 0.08), float("inf"), x)
        x = torch.where((pick >= 0.08) & (pick < 0.10), -0.0, x)
        x = torch.where((pick >= 0.10) & (pick < 0.12), 0.0, x)
    return x.to(dtype=dtype, device=device)


def spec(x, k):
    """The twin on the CPU, moved to x's device: the specification. (On CUDA, torch.sort orders NaNs otherwise: on
    the H200 its stable descending sort disagreed with the CPU's, in fp32 and bf16, on rows with several NaNs.)"""
    values, indices = reference.topk_rows(x.cpu(), k)
    return values.to(x.device), indices.to(x.device)


def assert_same_topk(got, want) -> None:
    (gv, gi), (wv, wi) = got, want
    assert gv.shape == wv.shape and gi.shape == wi.shape and gv.dtype == wv.dtype and gi.dtype == torch.long
    assert torch.equal(gi, wi), f"indices differ at {(gi != wi).nonzero()[:5].tolist()}"
    assert torch.equal(gv.view(BITS[gv.dtype]), wv.view(BITS[wv.dtype])), "values differ (bit for bit)"


def poison(nbytes: int, device) -> None:
    """Leave a freed NaN block in the allocator, so an output element that is never written shows up."""
    torch.full((nbytes // 4 + 1,), float("nan"), dtype=torch.float32, device=device)


def test_hand_built_row(device):
    require_kernel("topk_rows", device)
    nan, inf = float("nan"), float("inf")
    x = torch.tensor([[1.0, 3.0, 3.0, nan, -inf, nan, 0.0, -0.0, inf, -2.0]], device=device)
    order = [3, 5, 8, 1, 2, 0, 6, 7, 9, 4]  # NaNs by index, +inf, the tie 3, 3 by index, 0.0 == -0.0 by index
    for impl in (reference, ops):
        values, indices = impl.topk_rows(x, 10)
        assert indices[0].tolist() == order
        assert torch.equal(values.view(torch.int32), x[:, order].view(torch.int32))
        assert impl.topk_rows(x, 3)[1][0].tolist() == order[:3]


# (V, k): odd widths and the draft heads' (compact and full vocabulary); k across the CUDA kernel's register lists
# (4, 8, 16, 32) and past them (the sort path), up to k = V.
CASES = [(V, k) for V in (1, 7, 83, 769, 6592) for k in (1, 3, 10, 17, 32, 40, V) if k <= V]
CASES = sorted(set(CASES)) + [(49152, 1), (49152, 10), (49152, 40)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V, k", CASES)
@pytest.mark.parametrize("mode", ["random", "ties", "special"])
def test_kernel_equals_reference(device, dtype, V, k, mode):
    require_kernel("topk_rows", device)
    R = 72 if V == 6592 else 3  # 72: the most rows a Hydra++ step asks of one head
    x = rows((R, V), dtype, device, seed_of(dtype, V, k, mode), mode)
    poison(R * k * 8, device)
    assert_same_topk(ops.topk_rows(x, k), spec(x, k))


@pytest.mark.parametrize("dtype", DTYPES)
def test_leading_dims_and_empty_rows(device, dtype):
    require_kernel("topk_rows", device)
    x = rows((2, 3, 5, 83), dtype, device, seed_of("lead", dtype), "ties")
    assert_same_topk(ops.topk_rows(x, 6), spec(x, 6))
    for shape in [(0, 83), (2, 0, 83)]:
        values, indices = ops.topk_rows(torch.empty(shape, dtype=dtype, device=device), 4)
        assert values.shape == indices.shape == (*shape[:-1], 4) and indices.dtype == torch.long


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_and_transposed_inputs(device, dtype):
    require_kernel("topk_rows", device)
    x = rows((6, 6592), dtype, device, seed_of("strided", dtype), "special")
    strided = noncontiguous(x, 0)  # rows twice as far apart
    assert_same_topk(ops.topk_rows(strided, 10), spec(x, 10))
    sliced = rows((6, 6600), dtype, device, seed_of("sliced", dtype))[:, 3:6595]  # misaligned rows
    assert not sliced.is_contiguous()
    assert_same_topk(ops.topk_rows(sliced, 10), spec(sliced.contiguous(), 10))
    transposed = rows((301, 4), dtype, device, seed_of("t", dtype), "ties").t()  # [4, 301], last dim stride 4
    assert transposed.stride(-1) != 1
    assert_same_topk(ops.topk_rows(transposed, 9), spec(transposed.contiguous(), 9))
    broadcast = x[:1].expand(3, 6592)  # rows 0 apart: one row read three times
    assert_same_topk(ops.topk_rows(broadcast, 5), spec(broadcast.contiguous(), 5))


# ---------------------------------------------------------------------------------------------------------------
# opcheck, torch.compile, CUDA graphs


@pytest.mark.parametrize("k", [1, 8, 40])
def test_opcheck(device, k):
    require_kernel("topk_rows", device)
    x = rows((4, 97), torch.float32, device, seed_of("opcheck", k), "ties")
    torch.library.opcheck(torch.ops.hydra_fast.topk_rows.default, (x, k))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(device, backend):
    require_kernel("topk_rows", device)
    x = rows((5, 6592), torch.bfloat16, device, seed_of("compile"), "ties")

    def step(logits):
        values, indices = ops.topk_rows(logits * 2, 8)  # [5, 8] each
        return values.float().sum(-1), indices

    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True, backend=backend)(x)
    want = step(x)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or not ops.has_kernels("cuda"), reason="needs CUDA kernels")
@pytest.mark.parametrize("V, k", [(6592, 10), (49152, 1), (83, 40)])
def test_cuda_graph_replays_with_new_rows(V, k):
    device = torch.device("cuda")
    require_kernel("topk_rows", device)
    static = [rows((8, V), torch.bfloat16, device, seed_of("graph", V, 1), "ties"), k]
    fresh = [rows((8, V), torch.bfloat16, device, seed_of("graph", V, 2), "special"), k]
    static_out, want, _, _ = replay_cuda_graph(ops.topk_rows, static, fresh)
    assert_same_topk(static_out, want)
    assert_same_topk(static_out, spec(fresh[0], k))


# ---------------------------------------------------------------------------------------------------------------
# bad inputs: refused with what is wrong, before any kernel runs


@pytest.mark.parametrize("shape, dtype, k, match", [
    ((3, 10), torch.float32, 0, r"k must be in \[1, V = 10\]"),
    ((3, 10), torch.float32, 11, r"k must be in \[1, V = 10\]"),
    ((3, 10), torch.float32, -1, r"k must be in \[1, V = 10\]"),
    ((3, 10), torch.int64, 2, "x must be bfloat16, float16 or float32"),
    ((3, 10), torch.float64, 2, "x must be bfloat16, float16 or float32"),
    ((), torch.float32, 1, "at least 1 dim"),
    ((3, 0), torch.float32, 1, "last dim V must be >= 1"),
])
def test_bad_inputs(device, shape, dtype, k, match):
    require_kernel("topk_rows", device)
    x = torch.ones(shape, dtype=dtype, device=device)
    with pytest.raises(RuntimeError, match=match):
        ops.topk_rows(x, k)


def test_reference_refuses_bad_k():
    with pytest.raises(ValueError, match=r"k must be in \[1, V = 10\]"):
        reference.topk_rows(torch.ones(2, 10), 11)


@pytest.mark.parametrize("V, k", [(83, 5), (ops.TOPK_ROWS_MAX_WIDTH, 5), (ops.TOPK_ROWS_MAX_WIDTH + 1, 5),
                                  (83, ops.TOPK_ROWS_MAX_K + 1)])
def test_row_topk_picks_the_kernel_for_narrow_cuda_rows(device, monkeypatch, V, k):
    """row_topk (the draft's top-k): topk_rows' exact answer for CUDA rows up to TOPK_ROWS_MAX_WIDTH columns and k
    up to TOPK_ROWS_MAX_K with the kernels, torch.topk's otherwise (the reference ops, the CPU, wider rows, larger
    k or HYDRA_FAST_TOPK_ROWS=0). Rows without ties, so torch.topk's answer is defined too."""
    x = torch.randperm(4 * V, generator=generator(seed_of("row_topk", V))).view(4, V).float().to(device)
    impl = ops.implementation(device)
    want_kernel = impl is not reference and x.is_cuda and V <= ops.TOPK_ROWS_MAX_WIDTH and k <= ops.TOPK_ROWS_MAX_K
    calls = []
    real = ops.topk_rows
    monkeypatch.setattr(ops, "topk_rows", lambda *a: calls.append(1) or real(*a))
    values, indices = ops.row_topk(x, k, impl)
    top = torch.topk(x, k, dim=-1)
    assert torch.equal(values, top.values) and torch.equal(indices, top.indices)
    assert len(calls) == int(want_kernel)
    monkeypatch.setattr(ops, "TOPK_ROWS_ON", False)
    ops.row_topk(x, k, impl)
    assert len(calls) == int(want_kernel)  # switched off: torch.topk

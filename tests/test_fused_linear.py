"""The fused linear ops (linear, rms_norm_linear, add_rms_norm_linear with and without its SiLU-and-multiply
epilogue, "+silu" below) against reference.py.

On CUDA, up to 8 rows run one GEMV kernel whose prologue is the elementwise op; more rows, or unaligned rows, run
the elementwise kernel and cuBLAS. Both are covered here: each case's row count says which.
- The prologue is checked exactly: with an identity weight the product is the prologue's output (a sum of one
  product and zeros), so it must match the reference elementwise op within test_layer_ops' ulp budget; the
  epilogue likewise, with the weight [I | I] making gate and up the same normed row.
- The projection sums in another order than a GEMM: results match the reference to the dtype's rounding.
- The new residual stream of add_rms_norm_linear is exact (one rounded add).
Then opcheck, torch.compile(fullgraph=True), CUDA-graph capture and bad inputs.
"""
from __future__ import annotations

import math

import pytest
import torch

from conftest import (
    DTYPES, assert_names_cpu_argument, assert_op_refuses, cuda_ready, generator, needs_extension, noncontiguous, randn,
    replay_cuda_graph,
    require_kernel,
)
from hydra_fast import ops, reference
from test_layer_ops import assert_matches_reference, layout
from test_ops import seed_of

pytestmark = needs_extension

OPS = ["linear", "rms_norm_linear", "add_rms_norm_linear", "add_rms_norm_linear+silu"]
EPS = 1e-6


def op_name(op: str) -> str:
    return op.split("+")[0]


def call(impl, op: str, args):
    """impl's function for `op` ("+silu": add_rms_norm_linear with silu_mul=True) on args."""
    fn = getattr(impl, op_name(op))
    return fn(*args, silu_mul=True) if op.endswith("+silu") else fn(*args)


def make_inputs(op: str, rows: tuple, K: int, N: int, dtype, device, gen, bias: bool = True, kind="contiguous",
                weight=None):
    """The op's arguments: x [*rows, K] laid out as `kind`, weights scaled so the outputs are O(1) ("+silu": a
    gate | up weight [2N, K], so the output is [*rows, N])."""
    x = layout(randn((*rows, K), dtype, device, gen), kind)
    rows_w = 2 * N if op.endswith("+silu") else N
    if weight is None:
        weight = randn((rows_w, K), dtype, device, gen, scale=1.0 / math.sqrt(K))
    b = randn((rows_w,), dtype, device, gen) if bias else None
    if op == "linear":
        return [x, weight, b]
    norm = randn((K,), dtype, device, gen, scale=0.5) + 1.0
    if op == "rms_norm_linear":
        return [x, norm, EPS, weight, b]
    residual = layout(randn((*rows, K), dtype, device, gen), kind)
    return [x, residual, norm, EPS, weight, b]


def prologue(op: str, args):
    """The reference elementwise step of the op (its product's input rows)."""
    if op == "linear":
        return args[0]
    if op == "rms_norm_linear":
        return reference.rms_norm(*args[:3])
    return reference.add_rms_norm(*args[:4])[0]


# (rows, K, N, layout): few rows (the CUDA GEMV: 1, 2, 3, 8 rows, the CTA building them in turn up to 3 and a warp
# per row from 4; the CPU's few-rows kernel: 2 to 4, with K not a multiple of its 8 lanes and odd N at the end), more
# rows (the cuBLAS path: 9, 16, 32, 33, 64), widths of
# SmolLM2 (576, 1536) and Llama-8B (4096), a 17 MB weight of few rows (cuBLAS on CUDA), odd N, strided rows, and a
# misaligned slice (the cuBLAS path on CUDA)
CASES = [((1,), 64, 96, "contiguous"), ((1, 1), 576, 960, "contiguous"), ((1, 2), 576, 1539, "rows"),
         ((3,), 1536, 576, "contiguous"), ((8,), 4096, 130, "contiguous"), ((1,), 4096, 2100, "contiguous"),
         ((9,), 576, 200, "contiguous"), ((2, 8), 576, 96, "rows"), ((1, 32), 576, 70, "contiguous"),
         ((33,), 576, 40, "contiguous"), ((2, 32), 576, 70, "contiguous"), ((2,), 576, 33, "slice"),
         ((1, 5), 4096, 7, "rows"), ((4,), 75, 34, "contiguous"), ((1, 2), 83, 9, "rows")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{'x'.join(map(str, c[0]))}-K{c[1]}-N{c[2]}-{c[3]}")
def test_matches_reference(device, dtype, op, case):
    require_kernel(op_name(op), device)
    rows, K, N, kind = case
    gen = generator(seed_of("fused_linear", op, case, dtype))
    args = make_inputs(op, rows, K, N, dtype, device, gen, bias=(N % 2 == 0), kind=kind)
    got, want = call(ops, op, args), call(reference, op, args)
    if op_name(op) == "add_rms_norm_linear":
        assert torch.equal(got[1], want[1])  # the new residual stream: one rounded add
        assert got[1].is_contiguous()
        got, want = got[0], want[0]
    assert got.shape == want.shape == (*rows, N) and got.dtype == dtype and got.is_contiguous()
    # against the product in float64 of the same (reference) inputs: ours no further off than the dtype allows
    exact = torch.nn.functional.linear(prologue(op, args).double(), args[-2].double(),
                                       None if args[-1] is None else args[-1].double())
    if op.endswith("+silu"):
        gate, up = exact.chunk(2, dim=-1)
        exact = torch.nn.functional.silu(gate) * up
    tol = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    err = (got.double() - exact).abs() / (exact.abs() + 1.0)
    ref_err = (want.double() - exact).abs() / (exact.abs() + 1.0)
    assert err.max().item() <= max(tol, 2 * ref_err.max().item()), (err.max().item(), ref_err.max().item())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", OPS[1:])
@pytest.mark.parametrize("rows,K", [((1,), 576), ((4,), 64 + 8), ((2, 1), 1536), ((12,), 576), ((40,), 576)])
def test_prologue_is_exact(device, dtype, op, rows, K):
    """An identity weight makes the product the prologue itself: every element within the ulp budget of the
    reference norm (the GEMV's prologue, or the elementwise kernel at 12 and 40 rows); [I | I] makes gate and up that
    row, and the epilogue's output its SiLU-and-multiply."""
    require_kernel(op_name(op), device)
    gen = generator(seed_of("fused_linear_prologue", op, rows, K, dtype))
    eye = torch.eye(K, dtype=dtype, device=device)
    if op.endswith("+silu"):
        eye = torch.cat([eye, eye])
    args = make_inputs(op, rows, K, K, dtype, device, gen, bias=False, weight=eye)
    got = call(ops, op, args)
    got = got[0] if isinstance(got, tuple) else got
    if op.endswith("+silu"):
        # the epilogue alone: silu_mul of the op's own normed row (its prologue is checked without the epilogue),
        # on the CPU (CUDA's expf is a 2-ulp approximation; the kernels' exp is exact)
        row = ops.add_rms_norm_linear(*args[:4], eye[:K], None)[0]
        want = reference.silu_mul(torch.cat([row, row], dim=-1).cpu()).to(device)
    else:
        want = prologue(op, args)
    assert_matches_reference(got, want)


def small_inputs(op: str, device, seed: int = 0, rows=(3,), dtype=torch.float32):
    return make_inputs(op, rows, 64, 40, dtype, device, generator(seed_of("small", op, seed)))


# 3 rows: the GEMV on CUDA; 24 rows: the elementwise kernel + cuBLAS; 6 bf16 rows: the GEMV, a warp per row
ROW_CASES = [pytest.param((3,), torch.float32, id="gemv"), pytest.param((2, 3), torch.bfloat16, id="gemv6-bf16"),
             pytest.param((2, 12), torch.float32, id="gemm")]


@pytest.mark.parametrize("rows,dtype", ROW_CASES)
@pytest.mark.parametrize("op", OPS)
def test_opcheck(device, op, rows, dtype):
    require_kernel(op_name(op), device)
    args = small_inputs(op, device, rows=rows, dtype=dtype) + ([True] if op.endswith("+silu") else [])
    torch.library.opcheck(getattr(torch.ops.hydra_fast, op_name(op)).default, args)


def _all(impl, inputs):
    return [call(impl, op, args) for op, args in zip(OPS, inputs)]


def test_compile_fullgraph(device):
    for op in OPS:
        require_kernel(op_name(op), device)
    inputs = [small_inputs(op, device) for op in OPS]
    torch._dynamo.reset()
    got = torch.compile(lambda *a: _all(ops, a), fullgraph=True)(*inputs)
    for g, w in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(_all(ops, inputs))):
        assert torch.equal(g, w)


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_ready(), reason="needs a CUDA device and hydra_fast._C built with CUDA")
@pytest.mark.parametrize("rows,dtype", ROW_CASES)
@pytest.mark.parametrize("op", OPS)
def test_cuda_graph(op, rows, dtype):
    require_kernel(op_name(op), "cuda")
    static_out, want, _, _ = replay_cuda_graph(lambda *a: call(ops, op, a), small_inputs(op, "cuda", 1, rows, dtype),
                                               small_inputs(op, "cuda", 2, rows, dtype))
    for g, w in zip(torch.utils._pytree.tree_leaves(static_out), torch.utils._pytree.tree_leaves(want)):
        assert torch.equal(g, w)


# ---------------------------------------------------------------------------------------------------------------
# bad inputs: a RuntimeError that names what is wrong, before any kernel runs

def _bad():
    def base(op):
        return small_inputs(op, "cpu")  # x [3, 64], weight [40, 64], bias [40]

    def swap(op, index, value):
        args = list(base(op))
        args[index] = value
        return args

    w = base("linear")[1]
    cases = []
    for op in OPS[:3]:
        wi = len(base(op)) - 2  # the weight's position
        cases += [
            (op, "weight K", swap(op, wi, w[:, :32].contiguous()), r"weight.size\(1\) must be K"),
            (op, "weight dtype", swap(op, wi, w.half()), r"weight must have the dtype of x"),
            (op, "weight rank", swap(op, wi, w.reshape(-1)), r"weight must have 2 dims"),
            (op, "weight last dim", swap(op, wi, noncontiguous(w.t().contiguous(), 0).t()),
             r"weight must have a contiguous last dim"),
            (op, "bias size", swap(op, wi + 1, torch.zeros(39)), r"bias.size\(0\) must be N from weight"),
            (op, "bias dtype", swap(op, wi + 1, torch.zeros(40, dtype=torch.float16)), r"bias must have the dtype"),
            (op, "x dtype", swap(op, 0, base(op)[0].double()), r"x must be bfloat16, float16 or float32"),
        ]
    cases += [
        ("add_rms_norm_linear", "silu_mul odd rows", swap("add_rms_norm_linear", 4, w[:39])[:5] + [None, True],
         r"with silu_mul=True weight is gate \| up \[2I, K\]: its row count must be even"),
        ("rms_norm_linear", "norm size", swap("rms_norm_linear", 1, torch.zeros(8)), r"weight.size\(0\) must be d"),
        ("add_rms_norm_linear", "residual shape", swap("add_rms_norm_linear", 1, torch.zeros(2, 64)),
         r"residual must have x's shape"),
        ("rms_norm_linear", "eps", swap("rms_norm_linear", 2, -1.0), r"eps must be >= 0"),
    ]
    return cases


BAD = _bad()


@pytest.mark.parametrize("op,what,args,match", BAD, ids=[f"{b[0]}-{b[1]}" for b in BAD])
def test_bad_inputs(device, op, what, args, match):
    assert_op_refuses(device, op, args, match)


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_ready(), reason="needs a CUDA device and hydra_fast._C built with CUDA")
@pytest.mark.parametrize("op,index,name", [("linear", 1, "weight"), ("linear", 2, "bias"),
                                           ("add_rms_norm_linear", 1, "residual"), ("rms_norm_linear", 3, "weight")])
def test_device_mismatch(op, index, name):
    require_kernel(op, "cuda")
    assert_names_cpu_argument(getattr(ops, op), small_inputs(op, "cuda"), index, name)

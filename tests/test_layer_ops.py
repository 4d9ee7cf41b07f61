"""The fused decoder-layer ops (rms_norm, add_rms_norm, silu_mul, rope_kv_write) against reference.py.

The kernels follow the reference's rounding order, so they match it bit for bit except where the order of an fp32
sum differs (the mean square of the norms; PyTorch's own order depends on the CPU's vector width) or exp does
(silu): then the mean square is an ulp off, which after the rounding chain moves an fp32 output by a few ulp and
flips a 16-bit rounding on a small share of elements (ULP_BUDGET). RoPE without norms and every copy are exact. Per op: a
hand-built case with exact values, then seeded random inputs over dtypes, odd sizes, strided layouts, GQA ratios,
Qwen3 q/k norms, cache slots near and past the end; then opcheck, torch.compile(fullgraph=True), CUDA-graph capture
(cuda only) and bad inputs.
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
from test_ops import _clone, _replace, poison_allocator, seed_of

pytestmark = needs_extension

MANTISSA_BITS = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}
# dtype -> (most ulp any element may be off the reference, largest share of elements off at all). An ulp off
# the fp32 mean square (or exp) becomes a few fp32 ulp after two roundings and a product (4 seen on the CPU; on
# CUDA PyTorch's own rsqrtf and expf are 2-ulp approximations, hence 8), or one flipped 16-bit rounding that the
# weight product can make 2 ulp.
ULP_BUDGET = {torch.float32: (8.0, 1.0), torch.float16: (2.0, 0.02), torch.bfloat16: (2.0, 0.02)}


def ulp(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype` values at each element of t (normal numbers; at least the smallest normal's)."""
    _, exp = torch.frexp(t.float().abs())
    tiny = torch.finfo(dtype).tiny
    return torch.ldexp(torch.ones_like(t, dtype=torch.float32), exp - 1 - MANTISSA_BITS[dtype]).clamp(min=tiny)


def assert_matches_reference(out: torch.Tensor, ref: torch.Tensor, scale: float = 0.0):
    """Same shape, dtype and NaN positions; elsewhere within the dtype's ULP_BUDGET of the reference, counted in
    ulp of max(|ref|, scale): `scale` is the size of the terms of a sum that may cancel (RoPE after a norm)."""
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, out.dtype, ref.shape, ref.dtype)
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(out), nan), "NaN positions differ (an element not written, or a bad value)"
    o, r = out[~nan].float(), ref[~nan].float()
    if not r.numel():
        return
    max_ulp, max_share = ULP_BUDGET[out.dtype]
    steps = (o - r).abs() / ulp(r.abs().clamp(min=scale), out.dtype)
    assert steps.max().item() <= max_ulp, f"{out.dtype}: {steps.max().item():.3g} ulp off the reference"
    share = (steps > 0).float().mean().item()
    assert share <= max_share, f"{out.dtype}: {share:.2%} of elements off the reference (> {max_share:.0%})"


def layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """t itself, every other row of a buffer twice as tall (rows stay 16-byte aligned), or a slice one element
    into a wider buffer (misaligned: the CUDA kernels take their one-element path). Same values; the last two
    really are non-contiguous."""
    if kind == "contiguous":
        return t
    if kind == "rows":
        return noncontiguous(t, dim=t.dim() - 2)  # every other row: equally spaced, so one row stride
    wide = torch.full((*t.shape[:-1], t.shape[-1] + 1), float("nan"), dtype=t.dtype, device=t.device)
    wide[..., 1:] = t
    assert not wide[..., 1:].is_contiguous()
    return wide[..., 1:]


# ---------------------------------------------------------------------------------------------------------------
# rms_norm / add_rms_norm

# (shape, layout): every size once, each non-trivial layout at a small and a large width
NORM_CASES = [((1, 8), "contiguous"), ((7, 72), "rows"), ((83, 576), "slice"), ((83, 576), "contiguous"),
              ((2, 3, 4096 + 32), "rows"), ((1, 1, 4096), "contiguous"), ((3, 4096 + 32), "slice")]


def test_rms_norm_hand_built(device):
    require_kernel("rms_norm", device)
    x = torch.tensor([[3.0, 4.0], [1.0, 1.0]], device=device)
    weight = torch.tensor([2.0, 0.5], device=device)
    out = ops.rms_norm(x, weight, 0.0)  # mean squares 12.5 and 1
    want = torch.tensor([[2 * 3 / math.sqrt(12.5), 0.5 * 4 / math.sqrt(12.5)], [2.0, 0.5]], device=device)
    torch.testing.assert_close(out, want, atol=0, rtol=4e-7)  # 3 roundings


def case_id(case) -> str:
    return "x".join(map(str, case[0])) + "-" + case[1]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", NORM_CASES, ids=case_id)
def test_rms_norm(device, dtype, case):
    shape, kind = case
    require_kernel("rms_norm", device)
    gen = generator(seed_of("rms", shape, dtype, kind))
    x = layout(randn(shape, dtype, device, gen, 3.0), kind)
    weight = randn(shape[-1:], dtype, device, gen)
    poison_allocator(x.numel() * x.element_size(), device)
    out = ops.rms_norm(x, weight, 1e-6)
    assert out.is_contiguous() and out.device == x.device
    assert_matches_reference(out, reference.rms_norm(x, weight, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", NORM_CASES, ids=case_id)
def test_add_rms_norm(device, dtype, case):
    shape, kind = case
    require_kernel("add_rms_norm", device)
    gen = generator(seed_of("add_rms", shape, dtype, kind))
    x = layout(randn(shape, dtype, device, gen), kind)
    residual = randn(shape, dtype, device, gen, 4.0)  # contiguous: its own strides, unlike x's
    weight = randn(shape[-1:], dtype, device, gen)
    poison_allocator(2 * x.numel() * x.element_size(), device)
    out, h = ops.add_rms_norm(x, residual, weight, 1e-5)
    want_out, want_h = reference.add_rms_norm(x, residual, weight, 1e-5)
    assert torch.equal(h, want_h)  # the residual stream is one rounding: exact
    assert_matches_reference(out, want_out)


# ---------------------------------------------------------------------------------------------------------------
# silu_mul

SILU_CASES = [((1, 8), "contiguous"), ((7, 72), "slice"), ((83, 2 * 576), "rows"), ((83, 2 * 576), "contiguous"),
              ((2, 3, 4096 + 32), "slice"), ((1, 2 * 1536), "contiguous"), ((5, 2 * 1536), "rows")]


def test_silu_mul_hand_built(device):
    require_kernel("silu_mul", device)
    x = torch.tensor([[0.0, 2.0, -30.0, 5.0, 7.0, 3.0]], device=device)  # gate [0, 2, -30], up [5, 7, 3]
    want = torch.tensor([[0.0, 7 * 2 / (1 + math.exp(-2)), 3 * -30 / (1 + math.exp(30))]], device=device)
    torch.testing.assert_close(ops.silu_mul(x), want, atol=0, rtol=4e-7)  # 3 roundings


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SILU_CASES, ids=case_id)
def test_silu_mul(device, dtype, case):
    shape, kind = case
    require_kernel("silu_mul", device)
    gen = generator(seed_of("silu", shape, dtype, kind))
    x = layout(randn(shape, dtype, device, gen, 4.0), kind)
    poison_allocator(x.numel() * x.element_size(), device)
    out = ops.silu_mul(x)
    assert out.shape == (*shape[:-1], shape[-1] // 2) and out.is_contiguous()
    assert_matches_reference(out, reference.silu_mul(x))


# ---------------------------------------------------------------------------------------------------------------
# rope_kv_write

ROPE_CASES = [
    # B, N, Hq, Hkv, D, S, L, layer, cache_lens, qk_norm
    (1, 1, 9, 3, 64, 16, 2, 1, [5], False),  # SmolLM2's heads, one token
    (2, 7, 8, 2, 128, 40, 3, 2, [0, 33], True),  # GQA 4, Qwen3 norms, the tree ends in the last slot
    (3, 5, 4, 4, 64, 12, 1, 0, [9, 0, 11], False),  # slots past S: b0 writes 3 of 5 tokens, b2 one
    (1, 83, 32, 8, 128, 100, 2, 0, [10], True),  # Llama-3-8B's heads, 83 tokens
    (2, 4, 6, 1, 8, 8, 2, 1, [2, 8], True),  # D = 8, GQA 6, b1 entirely past S
    (1, 3, 2, 1, 72, 10, 1, 0, [0], True),  # D/2 = 36: no 16-byte vectors in 16-bit dtypes
]


def make_rope_inputs(case, dtype, device, strided: bool, seed: int):
    B, N, Hq, Hkv, D, S, L, layer, lens, qk_norm = case
    gen = generator(seed)
    qkv = randn((B, N, (Hq + 2 * Hkv) * D), dtype, device, gen, 2.0)
    angle = torch.rand(B, N, D // 2, generator=gen) * 10
    cos = torch.cat([angle.cos(), angle.cos()], -1).to(dtype=dtype, device=device)  # [B, N, D]
    sin = torch.cat([angle.sin(), angle.sin()], -1).to(dtype=dtype, device=device)
    q_norm = randn((D,), dtype, device, gen) if qk_norm else None
    k_norm = randn((D,), dtype, device, gen) if qk_norm else None
    if strided and N > 1:
        qkv, cos, sin = noncontiguous(qkv, dim=1), noncontiguous(cos, dim=1), noncontiguous(sin, dim=1)
    # Poisoned caches: NaN everywhere, so a slot that should be written and is not stays NaN.
    pad = 3 if strided else 0
    k_cache = torch.full((L, B, Hkv, S + pad, D), float("nan"), dtype=dtype, device=device)[:, :, :, :S]
    v_cache = torch.full((L, B, Hkv, S + pad, D), float("nan"), dtype=dtype, device=device)[:, :, :, :S]
    cache_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    return qkv, cos, sin, k_cache, v_cache, layer, cache_lens, Hq, Hkv, q_norm, k_norm, 1e-6


def rope_expected(args):
    """The reference's q and caches, with slots at or past S dropped (the reference clamps them to S - 1; run it
    on caches long enough to hold every slot, then cut them back)."""
    qkv, cos, sin, k_cache, v_cache, layer, cache_lens, Hq, Hkv, q_norm, k_norm, eps = args
    N, S = qkv.shape[1], k_cache.shape[3]
    grow = int(cache_lens.max()) + N
    k_big, v_big = (torch.cat([c, torch.full_like(c[:, :, :, :1], float("nan")).expand(-1, -1, -1, grow, -1)], 3)
                    for c in (k_cache, v_cache))
    q = reference.rope_kv_write(qkv, cos, sin, k_big, v_big, layer, cache_lens, Hq, Hkv, q_norm, k_norm, eps)
    return q, k_big[:, :, :, :S], v_big[:, :, :, :S]


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ROPE_CASES, ids=lambda c: "B{}-N{}-H{}x{}-D{}-S{}-norm{}".format(*c[:6], c[9]))
def test_rope_kv_write(device, dtype, case, strided):
    require_kernel("rope_kv_write", device)
    args = make_rope_inputs(case, dtype, device, strided, seed_of("rope", case, dtype, strided))
    qkv, cos, sin, k_cache, v_cache = args[:5]
    if strided and k_cache.shape[:3].numel() > 1:  # [1, 1, 1, S, D] slices stay contiguous
        assert not k_cache.is_contiguous() and not v_cache.is_contiguous()
        if qkv.shape[1] > 1:
            assert not qkv.is_contiguous() and not cos.is_contiguous() and not sin.is_contiguous()
    q_want, k_want, v_want = rope_expected(args)
    poison_allocator(q_want.numel() * q_want.element_size(), device)
    q = ops.rope_kv_write(*args)
    assert q.shape == q_want.shape and q.is_contiguous()
    if args[9] is None:  # no norm, no sum: the same roundings in the same order, exact
        assert torch.equal(q, q_want) and torch.equal(k_cache.nan_to_num(), k_want.nan_to_num())
    # normalised heads times N(0, 1) weights: the rotation's terms are a few units in size, counted as 2
    assert_matches_reference(q, q_want, scale=2.0)
    assert_matches_reference(k_cache, k_want, scale=2.0)  # NaN exactly at the unwritten slots (other layers, past S)
    assert torch.equal(v_cache.isnan(), v_want.isnan())
    assert torch.equal(v_cache.nan_to_num(), v_want.nan_to_num())  # v is a copy: exact
    B, N, S = qkv.shape[0], qkv.shape[1], k_cache.shape[3]
    written = (~k_cache.isnan()).all(-1)  # [L, B, Hkv, S]: rows written in full
    lens = args[6].cpu()
    for b in range(B):
        valid = max(0, min(N, S - int(lens[b])))
        assert int(written[:, b].sum()) == valid * k_cache.shape[2], f"sequence {b}: wrong rows written"


def test_rope_kv_write_hand_built(device):
    require_kernel("rope_kv_write", device)
    # cos = 1, sin = 0: q and k unchanged; cos = 0, sin = 1: rotate_half exactly ([-x2, x1]).
    B, N, Hq, Hkv, D = 1, 2, 2, 1, 4
    qkv = torch.arange(1.0, 1.0 + N * (Hq + 2 * Hkv) * D, device=device).view(B, N, -1)
    cos = torch.tensor([[[1.0] * D, [0.0] * D]], device=device)
    sin = torch.tensor([[[0.0] * D, [1.0] * D]], device=device)
    k_cache = torch.zeros(1, B, Hkv, 4, D, device=device)
    v_cache = torch.zeros(1, B, Hkv, 4, D, device=device)
    lens = torch.tensor([1], dtype=torch.int32, device=device)
    q = ops.rope_kv_write(qkv, cos, sin, k_cache, v_cache, 0, lens, Hq, Hkv, None, None, 1e-6)
    heads = qkv.view(B, N, Hq + 2 * Hkv, D)
    rot = torch.cat([-heads[..., 2:], heads[..., :2]], -1)
    assert torch.equal(q[0, 0], heads[0, 0, :Hq]) and torch.equal(q[0, 1], rot[0, 1, :Hq])
    assert torch.equal(k_cache[0, 0, 0, 1], heads[0, 0, Hq]) and torch.equal(k_cache[0, 0, 0, 2], rot[0, 1, Hq])
    assert torch.equal(v_cache[0, 0, 0, 1:3], heads[0, :, Hq + Hkv])
    assert (k_cache[0, 0, 0, [0, 3]] == 0).all() and (v_cache[0, 0, 0, [0, 3]] == 0).all()


# ---------------------------------------------------------------------------------------------------------------
# opcheck, torch.compile, CUDA graphs

OPS = ["rms_norm", "add_rms_norm", "silu_mul", "rope_kv_write"]


def small_inputs(op: str, device, seed: int = 0):
    gen = generator(seed_of("small", op, seed))
    if op == "rms_norm":
        return randn((3, 5, 24), torch.float32, device, gen), randn((24,), torch.float32, device, gen), 1e-6
    if op == "add_rms_norm":
        return (randn((3, 24), torch.float32, device, gen), randn((3, 24), torch.float32, device, gen),
                randn((24,), torch.float32, device, gen), 1e-6)
    if op == "silu_mul":
        return (randn((4, 2, 32), torch.float32, device, gen),)
    assert op == "rope_kv_write"
    args = list(make_rope_inputs((2, 3, 4, 2, 16, 8, 2, 1, [2, 6], True), torch.float32, device, False,
                                 seed_of("small-rope", seed)))
    args[3] = randn(args[3].shape, torch.float32, device, gen)  # opcheck compares caches: no NaN
    args[4] = randn(args[4].shape, torch.float32, device, gen)
    return tuple(args)


@pytest.mark.parametrize("op", OPS)
def test_opcheck(device, op):
    require_kernel(op, device)
    torch.library.opcheck(getattr(torch.ops.hydra_fast, op).default, small_inputs(op, device))


def _layer(impl, norm_args, add_args, silu_args, rope_args):
    return (impl.rms_norm(*norm_args), impl.add_rms_norm(*add_args), impl.silu_mul(*silu_args),
            impl.rope_kv_write(*rope_args))


def test_compile_fullgraph(device):
    for op in OPS:
        require_kernel(op, device)
    inputs = [small_inputs(op, device) for op in OPS]
    eager_rope = _clone(inputs[3])
    torch._dynamo.reset()
    got = torch.compile(lambda *a: _layer(ops, *a), fullgraph=True)(*inputs[:3], inputs[3])
    want = _layer(ops, *inputs[:3], eager_rope)
    for g, w in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
        assert torch.equal(g, w)
    assert torch.equal(inputs[3][3], eager_rope[3]) and torch.equal(inputs[3][4], eager_rope[4])


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_ready(), reason="needs a CUDA device and hydra_fast._C built with CUDA")
@pytest.mark.parametrize("op", OPS)
def test_cuda_graph(op):
    # Capture with one set of inputs, refill the same buffers with new values, replay, compare with eager.
    require_kernel(op, "cuda")
    static_out, want, static, want_args = replay_cuda_graph(getattr(ops, op), list(small_inputs(op, "cuda", seed=1)),
                                                            list(small_inputs(op, "cuda", seed=2)))
    for g, w in zip(torch.utils._pytree.tree_leaves(static_out), torch.utils._pytree.tree_leaves(want)):
        assert torch.equal(g, w)
    for g, w in zip(static, want_args):  # rope_kv_write's caches
        if isinstance(g, torch.Tensor):
            assert torch.equal(g, w)


# ---------------------------------------------------------------------------------------------------------------
# bad inputs: a RuntimeError that names what is wrong, before any kernel runs


def _norm_bad():
    x, w, eps = small_inputs("rms_norm", "cpu")  # x [3, 5, 24]
    return [
        ("rms_norm", "weight size", [x, w[:8], eps], r"weight.size\(0\) must be d"),
        ("rms_norm", "weight dtype", [x, w.half(), eps], r"weight must have the dtype of x"),
        ("rms_norm", "x dtype", [x.double(), w.double(), eps], r"x must be bfloat16, float16 or float32"),
        ("rms_norm", "x last dim", [x.transpose(1, 2).contiguous().transpose(1, 2), w, eps],
         r"x must have a contiguous last dim"),
        ("rms_norm", "x leading dims", [x.transpose(0, 1), w, eps], r"one run of equally spaced rows"),
        ("rms_norm", "eps", [x, w, -1.0], r"eps must be >= 0"),
        ("rms_norm", "weight rank", [x, w.view(2, 12), eps], r"weight must have 1 dims"),
        ("add_rms_norm", "residual shape", [x, x[:2], w, eps], r"residual must have x's shape"),
        ("add_rms_norm", "residual dtype", [x, x.half(), w, eps], r"residual must have the dtype of x"),
    ]


def _silu_bad():
    (x,) = small_inputs("silu_mul", "cpu")  # [4, 2, 32]
    return [
        ("silu_mul", "odd last dim", [x[..., :31]], r"last dim must be even"),
        ("silu_mul", "x dtype", [x.double()], r"x must be bfloat16, float16 or float32"),
        ("silu_mul", "x last dim", [x.transpose(1, 2)], r"x must have a contiguous last dim"),
    ]


def _rope_bad():
    def base():
        return list(small_inputs("rope_kv_write", "cpu"))  # qkv [2, 3, 128], D 16, caches [2, 2, 2, 8, 16]
    qkv, cos, sin, k, v, layer, lens, Hq, Hkv, qn, kn, eps = base()
    return [("rope_kv_write",) + c for c in [
        ("qkv width", _replace(base(), 0, qkv[..., :112]), r"qkv.size\(2\) must be \(num_q_heads \+ 2 num_kv_heads\)"),
        ("num_kv_heads", _replace(base(), 8, 3), r"qkv.size\(2\)|k_cache"),
        ("odd D", _replace(_replace(base(), 1, cos[..., :15]), 2, sin[..., :15]), r"head dim D .* must be even"),
        ("cos shape", _replace(base(), 1, cos[:, :2]), r"cos.size\(1\) must be N from qkv"),
        ("sin dtype", _replace(base(), 2, sin.half()), r"sin must have the dtype of qkv"),
        ("k_cache D", _replace(base(), 3, torch.zeros(2, 2, 2, 8, 8)), r"k_cache.size\(4\) must be D"),
        ("k_cache heads", _replace(base(), 3, torch.zeros(2, 2, 1, 8, 16)), r"k_cache.size\(2\) must be num_kv_heads"),
        ("v_cache shape", _replace(base(), 4, v[:, :, :, :7]), r"v_cache"),
        ("cache dtype", _replace(base(), 4, v.half()), r"v_cache must have the dtype of qkv"),
        ("layer", _replace(base(), 5, 2), r"layer must be in \[0, L = 2\)"),
        ("negative layer", _replace(base(), 5, -1), r"layer must be in"),
        ("cache_lens dtype", _replace(base(), 6, lens.long()), r"cache_lens must be Int"),
        ("cache_lens size", _replace(base(), 6, lens[:1]), r"cache_lens.size\(0\) must be B"),
        ("q_norm size", _replace(base(), 9, qn[:8]), r"q_norm.size\(0\) must be D"),
        ("k_norm dtype", _replace(base(), 10, kn.half()), r"k_norm must have the dtype of qkv"),
        ("qkv rank", _replace(base(), 0, qkv[0]), r"qkv must have 3 dims"),
        ("qkv last dim", _replace(base(), 0, qkv.transpose(1, 2).contiguous().transpose(1, 2)),
         r"qkv must have a contiguous last dim"),
    ]]


BAD = _norm_bad() + _silu_bad() + _rope_bad()


@pytest.mark.parametrize("op,what,args,match", BAD, ids=[f"{b[0]}-{b[1]}" for b in BAD])
def test_bad_inputs(device, op, what, args, match):
    assert_op_refuses(device, op, args, match)


MISMATCH = [("rms_norm", 1, "weight"), ("add_rms_norm", 1, "residual"), ("rope_kv_write", 1, "cos"),
            ("rope_kv_write", 3, "k_cache"), ("rope_kv_write", 6, "cache_lens"), ("rope_kv_write", 9, "q_norm")]


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_ready(), reason="needs a CUDA device and hydra_fast._C built with CUDA")
@pytest.mark.parametrize("op,index,name", MISMATCH)
def test_device_mismatch(op, index, name):
    require_kernel(op, "cuda")
    assert_names_cpu_argument(getattr(ops, op), small_inputs(op, "cuda"), index, name)

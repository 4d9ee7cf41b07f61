"""bench_ops.py cases of the fused decoder-layer ops: rms_norm, add_rms_norm, silu_mul, rope_kv_write.

Shapes of one decoder layer of SmolLM2-135M and Llama-3-8B at R = 1, 16, 64 rows (decode, a tree of 16 or 64
nodes), bf16. Byte models (each input byte read once, each output byte written once):
- rms_norm: x + weight + out. add_rms_norm: x + residual + weight + out + the new residual.
- silu_mul: gate|up [R, 2I] + out [R, I].
- rope_kv_write: q|k|v [R, (Hq + 2 Hkv) D] + cos + sin + q out + K and V written into the cache.
Input sets rotate the rows (and, for rope_kv_write, the cache layer and slots) so timing does not sit in L2.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import common as C

LAYER_OPS = ("rms_norm", "add_rms_norm", "silu_mul", "rope_kv_write")
BF16 = 2


@dataclass(frozen=True)
class LayerShape:
    d: int  # hidden size
    inter: int  # MLP intermediate size I
    hq: int
    hkv: int
    head_dim: int
    layers: int
    qk_norm: bool = False


MODELS = {
    "smollm2": LayerShape(576, 1536, 9, 3, 64, 30),
    "llama3-8b": LayerShape(4096, 14336, 32, 8, 128, 32),
}
ROWS = {"full": (1, 16, 64), "quick": (1, 16)}
CACHE_SLOTS = 2048  # S of the rope_kv_write cache


def _preset(sizes) -> str:
    from op_cases import SIZES

    return "quick" if sizes is SIZES["quick"] else "full"


def _models(sizes) -> dict:
    return {"smollm2": MODELS["smollm2"]} if _preset(sizes) == "quick" else MODELS


def _case(op, label, nbytes, make_set, call, truth_of, runner, notes, **extra):
    import op_cases as O
    from hydra_fast import ops, reference

    return O.Case(op=op, label=label, nbytes=nbytes, flops=0, notes=notes, make_set=make_set,
                  bytes_per_set=nbytes, truth=truth_of(lambda s: call(s, getattr(reference, op))),
                  check=_check, methods=O._std_methods(op, runner, lambda s: call(s, getattr(ops, op)),
                                                       lambda s, impl=getattr(reference, op): call(s, impl)),
                  **extra)


def _check(outs, refs) -> dict:
    """Every output within bf16 rounding of the reference (same rounding order: equal but for a last bit)."""
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    refs = refs if isinstance(refs, (tuple, list)) else (refs,)
    results = [C.compare(o, r, tol=1e-2) for o, r in zip(outs, refs)]
    worst = max(results, key=lambda r: r.get("rel_err", float("inf")))
    return dict(worst, ok=all(r["ok"] for r in results))


def _rand(shape, i: int, device, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(6000 + i)
    return (torch.randn(shape, generator=g, device=device) * scale).to(torch.bfloat16)


def norm_cases(op: str):
    def build(sizes, device, runner) -> list:
        cases = []
        for name, m in _models(sizes).items():
            weight = _rand((m.d,), 0, device)
            for R in ROWS[_preset(sizes)]:
                inputs = 2 if op == "add_rms_norm" else 1
                outputs = inputs
                nbytes = ((inputs + outputs) * R * m.d + m.d) * BF16

                def make_set(i, R=R, m=m, inputs=inputs):
                    s = dict(x=_rand((R, m.d), 2 * i + 1, device))
                    if inputs == 2:
                        s["res"] = _rand((R, m.d), 2 * i + 2, device, 4.0)
                    return s

                if op == "rms_norm":
                    def call(s, impl, weight=weight):
                        return impl(s["x"], weight, 1e-5)
                else:
                    def call(s, impl, weight=weight):
                        return impl(s["x"], s["res"], weight, 1e-5)
                cases.append(_case(op, dict(model=name, d=m.d, R=R), nbytes, make_set, call, lambda f: f, runner,
                                   "x" + (" + residual" if inputs == 2 else "") + " + weight + out"
                                   + (" + x + residual" if inputs == 2 else "") + ", bf16, eps 1e-5."))
        return cases
    return build


def silu_mul_cases(sizes, device, runner) -> list:
    cases = []
    for name, m in _models(sizes).items():
        for R in ROWS[_preset(sizes)]:
            nbytes = 3 * R * m.inter * BF16

            def make_set(i, R=R, m=m):
                return dict(x=_rand((R, 2 * m.inter), i, device, 2.0))

            def call(s, impl):
                return impl(s["x"])
            cases.append(_case("silu_mul", dict(model=name, I=m.inter, R=R), nbytes, make_set, call, lambda f: f,
                               runner, "gate|up [R, 2I] + out [R, I], bf16."))
    return cases


def rope_kv_write_cases(sizes, device, runner) -> list:
    cases = []
    for name, m in _models(sizes).items():
        shape = (m.layers, 1, m.hkv, CACHE_SLOTS, m.head_dim)  # [L, B, Hkv, S, D]
        k_cache, v_cache = _rand(shape, 1, device), _rand(shape, 2, device)
        for R in ROWS[_preset(sizes)]:
            heads = m.hq + 2 * m.hkv
            nbytes = (2 * R * heads * m.head_dim + 2 * R * m.head_dim) * BF16 + 4
            windows = CACHE_SLOTS // R

            def make_set(i, R=R, m=m, heads=heads, windows=windows):
                angle = torch.rand((1, R, m.head_dim // 2), device=device) * 100
                cos = torch.cat([angle.cos(), angle.cos()], -1).to(torch.bfloat16)  # [B, R, D]
                sin = torch.cat([angle.sin(), angle.sin()], -1).to(torch.bfloat16)
                lens = torch.full((1,), (i % windows) * R, dtype=torch.int32, device=device)
                return dict(qkv=_rand((1, R, heads * m.head_dim), i, device), cos=cos, sin=sin, k=k_cache,
                            v=v_cache, layer=i % m.layers, lens=lens)

            def call(s, impl, m=m):
                return impl(s["qkv"], s["cos"], s["sin"], s["k"], s["v"], s["layer"], s["lens"], m.hq, m.hkv, None,
                            None, 1e-6)

            def written(s, q, R=R):
                start = int(s["lens"][0])  # outside the timed call
                rows = slice(start, start + R)
                return q, s["k"][s["layer"], :, :, rows], s["v"][s["layer"], :, :, rows]

            def fresh(s):
                return dict(s, k=s["k"].clone(), v=s["v"].clone())

            cases.append(_case("rope_kv_write", dict(model=name, heads=f"{m.hq}x{m.hkv}", D=m.head_dim, R=R),
                               nbytes, make_set, call, lambda f, written=written: lambda s: written(s, f(s)), runner,
                               f"q|k|v + cos + sin + q out + K, V rows into the cache [L, 1, Hkv, {CACHE_SLOTS}, D];"
                               " input sets rotate the layer and the slots. bf16.",
                               check_set=fresh, mutates=True, output_of=written,
                               alloc_per_set=nbytes))
    return cases


LAYER_BUILDERS = {
    "rms_norm": norm_cases("rms_norm"),
    "add_rms_norm": norm_cases("add_rms_norm"),
    "silu_mul": silu_mul_cases,
    "rope_kv_write": rope_kv_write_cases,
}

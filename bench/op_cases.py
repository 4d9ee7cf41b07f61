"""The benchmark cases of bench_ops.py: per op, its sizes, input sets, byte model, methods and check.

Byte models (B = 1, bf16 = 2 bytes; each input byte the op must read once, each output byte written once):
- tree_attention: q + K and V of the len + N visible positions + tree mask + out. flops = 4 Hq N (len + N) D.
- accept_*: all N rows of logits (N V 2) + candidates + paths + outputs. A kernel that skips the rows of leaves
  not on the accepted path can beat this "floor".
- draft_head_mlp: every weight and bias + hidden + the R k gathered embedding rows + path tokens + out.
  flops = 2 R (weight elements).
- kv_compact: for K and V, the slots that really move (accepted node j with index != j), read + written.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

import common as C

OPS = ("tree_attention", "accept_greedy", "accept_typical", "draft_head_mlp", "kv_compact")
BF16 = 2


@dataclass(frozen=True)
class AttnShape:
    hq: int
    hkv: int
    d: int


@dataclass(frozen=True)
class KvShape:
    layers: int
    hkv: int
    d: int


@dataclass(frozen=True)
class Sizes:
    tree: str
    attn: dict  # name -> AttnShape
    contexts: tuple[int, ...]
    vocab: tuple[int, ...]
    mlp: tuple[tuple[int, int], ...]  # (d, V)
    mlp_grid: tuple[tuple[int, int, int], ...]  # (R, k, blocks)
    kv: dict  # name -> KvShape
    kv_seq: int


def _grid(rows, ks, blocks):
    return tuple((r, k, nb) for k in ks for nb in blocks for r in rows)


SIZES = {
    "full": Sizes(
        tree="mc_sim_7b_63",
        attn={"llama2-7b": AttnShape(32, 32, 128), "llama3-8b": AttnShape(32, 8, 128),
              "smollm2": AttnShape(9, 3, 64)},
        contexts=(512, 2048, 8192, 32768),
        vocab=(32000, 49152, 128256),
        mlp=((576, 49152), (4096, 32000)),
        mlp_grid=_grid((1, 10, 64), (0, 1, 4), (1, 4)),
        kv={"llama-7b": KvShape(32, 32, 128), "smollm2": KvShape(30, 3, 64)},
        kv_seq=4096,
    ),
    "quick": Sizes(
        tree="mc_sim_7b_63",
        attn={"smollm2": AttnShape(9, 3, 64), "llama3-8b": AttnShape(32, 8, 128)},
        contexts=(192,),
        vocab=(1000,),
        mlp=((64, 1000),),
        mlp_grid=((1, 0, 1), (10, 2, 2)),
        kv={"tiny": KvShape(2, 2, 16)},
        kv_seq=512,
    ),
}


@dataclass
class Method:
    name: str
    kind: str  # ours | eager | compile | baseline
    build: Callable[[list[dict]], Callable[[dict], Any]]  # may raise (or Skip); called once per case
    post: Callable[[Any], Any] = lambda out: out  # output -> the reference's layout, for the check only


@dataclass
class Case:
    op: str
    label: dict
    nbytes: int
    flops: int
    notes: str
    make_set: Callable[[int], dict]
    bytes_per_set: int  # bytes one call touches: rotation counts sets until they exceed the target
    truth: Callable[[dict], Any]
    check: Callable[[Any, Any], dict]
    methods: list[Method] = field(default_factory=list)
    alloc_per_set: int | None = None
    max_sets: int = 1 << 30
    check_set: Callable[[dict], dict] = lambda s: s  # a fresh set for ops that mutate their inputs
    mutates: bool = False  # timing changes the inputs: the truth is recomputed before each method's check
    output_of: Callable[[dict, Any], Any] = lambda s, out: out


def _gen(device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _randn(shape, gen, device, dtype=torch.bfloat16, scale=1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=gen, device=device) * scale).to(dtype)


def _std_methods(op: str, runner, ours, ref) -> list[Method]:
    """ours, eager reference and torch.compile(reference); each fn takes one input set (a dict)."""
    return [Method("ours", "ours", lambda sets: ours),
            Method("eager", "eager", lambda sets: ref),
            Method("compile", "compile", lambda sets: _compiled_call(runner, op, ref))]


def _compiled_call(runner, op: str, ref):
    from hydra_fast import reference

    cfn = runner.compiled(getattr(reference, op), key=op)
    return lambda s: ref(s, impl=cfn)


# -- tree_attention --------------------------------------------------------------------------------------------
def tree_attention_cases(sizes: Sizes, device, runner) -> list[Case]:
    from hydra_fast import ops, reference, tree

    tb = tree.Tree.from_choices(sizes.tree).buffers(device)
    N = tb.num_nodes
    cases = []
    for name, a in sizes.attn.items():
        for S in sizes.contexts:
            cases.append(_attn_case(name, a, S, N, tb.tree_mask, device, runner, ops, reference))
    return cases


def _attn_case(name, a: AttnShape, S, N, tree_mask, device, runner, ops, reference) -> Case:
    B, length, group, scale = 1, S - N, a.hq // a.hkv, a.d ** -0.5
    q_bytes, kv_bytes = B * a.hq * N * a.d * BF16, 2 * B * a.hkv * S * a.d * BF16
    nbytes = q_bytes + kv_bytes + N * N + 4 + B * N * a.hq * a.d * BF16
    flops = 4 * B * a.hq * N * S * a.d

    def make_set(i):
        g = _gen(device, 1000 + i)
        q = _randn((B, N, a.hq, a.d), g, device).transpose(1, 2)  # [B, Hq, N, D], a view of the projection
        k = _randn((B, a.hkv, S, a.d), g, device)  # [B, Hkv, S, D]
        v = _randn((B, a.hkv, S, a.d), g, device)
        lens = torch.full((B,), length, dtype=torch.int32, device=device)
        return dict(q=q, k=k, v=v, lens=lens, mask=tree_mask)

    def call(s, impl):
        return impl(s["q"], s["k"], s["v"], s["lens"], s["mask"], scale)

    def truth(s):
        return reference.tree_attention(s["q"].float(), s["k"].float(), s["v"].float(), s["lens"], s["mask"], scale)

    allowed = torch.zeros(N, S, dtype=torch.bool, device=device)  # [N, S] the dense mask of SDPA
    allowed[:, :length] = True
    allowed[:, length:] = tree_mask

    def sdpa_expanded(sets):
        kv = [(s["k"].repeat_interleave(group, 1), s["v"].repeat_interleave(group, 1)) if group > 1
              else (s["k"], s["v"]) for s in sets]  # [B, Hq, S, D] each, built outside the timed call

        def fn(s):
            k, v = kv[s["_idx"]]
            return F.scaled_dot_product_attention(s["q"], k, v, attn_mask=allowed, scale=scale)
        return fn

    def sdpa_gqa(sets):
        return lambda s: F.scaled_dot_product_attention(s["q"], s["k"], s["v"], attn_mask=allowed, scale=scale,
                                                        enable_gqa=True)

    def flex(sets):
        from torch.nn.attention.flex_attention import create_block_mask

        lens, tm = sets[0]["lens"], tree_mask

        def mask_mod(b, h, q_idx, kv_idx):
            rel = kv_idx - lens[b]
            return (rel < 0) | ((rel < N) & tm[q_idx, rel.clamp(0, N - 1)])

        block_mask = create_block_mask(mask_mod, None, None, N, S, device=str(device))

        fl = runner.flex()  # compiled for this shape (static), as ours and the compiled reference are
        return lambda s: fl(s["q"], s["k"], s["v"], block_mask=block_mask, scale=scale, enable_gqa=group > 1)

    to_bnhd = lambda out: out.transpose(1, 2)  # noqa: E731 - [B, Hq, N, D] -> [B, N, Hq, D]
    methods = _std_methods("tree_attention", runner, lambda s: call(s, ops.tree_attention),
                           lambda s, impl=reference.tree_attention: call(s, impl))
    methods.append(Method("sdpa", "baseline", sdpa_expanded, to_bnhd))
    if group > 1:
        methods.append(Method("sdpa_gqa", "baseline", sdpa_gqa, to_bnhd))
    methods.append(Method("flex", "baseline", flex, to_bnhd))
    alloc = q_bytes + kv_bytes * (1 + (group if group > 1 else 0)) + N * S
    return Case(op="tree_attention", label=dict(model=name, S=S), nbytes=nbytes, flops=flops,
                notes="q + K,V[0:len+N] + tree mask + out (len = S - N, N = 64 nodes). sdpa: bool mask [N, S], "
                      "K/V pre-expanded to Hq heads outside the timed call; sdpa_gqa: enable_gqa=True; flex: "
                      "flex_attention compiled with static shapes per case, block mask built outside the timed call.",
                make_set=make_set, bytes_per_set=q_bytes + kv_bytes, alloc_per_set=alloc, truth=truth,
                check=lambda out, ref: C.compare(out, ref, tol=2e-2), methods=methods)


# -- accept_greedy / accept_typical ----------------------------------------------------------------------------
def accept_cases(op: str):
    def build(sizes: Sizes, device, runner) -> list[Case]:
        from hydra_fast import ops, reference, tree

        tb = tree.Tree.from_choices(sizes.tree).buffers(device)
        return [_accept_case(op, V, tb, device, runner, ops, reference) for V in sizes.vocab]
    return build


def _accept_case(op, V, tb, device, runner, ops, reference) -> Case:
    B, N, paths = 1, tb.num_nodes, tb.paths
    P, L = paths.shape
    paths_cpu, parents = paths.cpu(), tb.parents.cpu()
    nbytes = B * N * V * BF16 + B * N * 8 + P * L * 8 + 4 + B * 8 + 2 * B * L * 8

    def make_set(i):
        g = _gen(device, 2000 + i)
        logits = _randn((B, N, V), g, device, torch.float32, 2.0)  # [B, N, V]
        cand = torch.randint(0, V, (B, N), generator=g, device=device)  # [B, N]
        gc = torch.Generator().manual_seed(i)
        row = paths_cpu[int(torch.randint(0, P, (1,), generator=gc))]
        depth = int((row >= 0).sum()) - 1
        accept = int(torch.randint(0, depth + 1, (1,), generator=gc))  # 0 .. depth drafts made acceptable
        nodes = [int(n) for n in row[1:accept + 1]]
        for n in nodes:  # the parent's row puts most of its mass on the child's token
            logits[0, int(parents[n]), int(cand[0, n])] = 14.0
        uniform = torch.rand((B,), generator=g, device=device)
        return dict(logits=logits.to(torch.bfloat16), cand=cand, paths=paths, uniform=uniform)

    if op == "accept_greedy":
        def call(s, impl):
            return impl(s["logits"], s["cand"], s["paths"])
    else:
        def call(s, impl):
            return impl(s["logits"], s["cand"], s["paths"], s["uniform"], 0.7, 0.09, 0.3)
    ref = getattr(reference, op)
    return Case(op=op, label=dict(V=V), nbytes=nbytes, flops=0,
                notes=f"all N rows of bf16 logits (N = {N}, P = {P} paths, L = {L}) + candidates + paths + outputs; "
                      "logits rows of a random path made acceptable to a random depth; typical: T 0.7, eps 0.09, "
                      "alpha 0.3. Target <= 20 us and >= 5x eager."
                      + (" The typical reference (eager and compiled) computes its softmax in float64, as the "
                         "spec does: its x eager overstates the gain over a float32 implementation."
                         if op == "accept_typical" else ""),
                make_set=make_set, bytes_per_set=nbytes, truth=lambda s: call(s, ref),
                check=C.compare_exact,
                methods=_std_methods(op, runner, lambda s: call(s, getattr(ops, op)),
                                     lambda s, impl=ref: call(s, impl)))


# -- draft_head_mlp --------------------------------------------------------------------------------------------
def draft_head_cases(sizes: Sizes, device, runner) -> list[Case]:
    from hydra_fast import ops, reference

    # [V, d] per model, shared by all sets and cases of that d
    embeds = {d: _randn((V, d), _gen(device, 3), device, scale=0.5) for d, V in sizes.mlp}
    # the models alternate, so a compile budget spent before the end skips the same configs of both
    vocab = ", ".join(f"V {V} for d {d}" for d, V in sizes.mlp)
    return [_mlp_case(d, V, R, k, nb, embeds[d], vocab, device, runner, ops, reference)
            for R, k, nb in sizes.mlp_grid for d, V in sizes.mlp]


def _mlp_case(d, V, R, k, nb, embed, vocab, device, runner, ops, reference) -> Case:
    w_elems = d * (k + 1) * d + (nb - 1) * d * d + (d * (k + 1) * d if k > 0 else 0)
    b_elems = nb * d + (d if k > 0 else 0)
    set_bytes = (w_elems + b_elems + R * d) * BF16 + R * k * 8
    nbytes = set_bytes + R * k * d * BF16 + R * d * BF16

    def make_set(i):
        g = _gen(device, 4000 + i)
        fan0 = (k + 1) * d
        ws = [_randn((d, fan0), g, device, scale=fan0 ** -0.5)]  # [d, (k+1)d]
        ws += [_randn((d, d), g, device, scale=d ** -0.5) for _ in range(nb - 1)]  # [d, d]
        bs = [_randn((d,), g, device, scale=0.1) for _ in range(nb)]
        rw = _randn((d, fan0), g, device, scale=fan0 ** -0.5) if k > 0 else None
        rb = _randn((d,), g, device, scale=0.1) if k > 0 else None
        return dict(hidden=_randn((R, d), g, device), tokens=torch.randint(0, V, (R, k), generator=g, device=device),
                    ws=ws, bs=bs, rw=rw, rb=rb)

    def call(s, impl):
        return impl(s["hidden"], s["tokens"], embed, s["ws"], s["bs"], s["rw"], s["rb"])

    def truth(s):
        f = lambda t: None if t is None else t.float()  # noqa: E731
        return reference.draft_head_mlp(f(s["hidden"]), s["tokens"], embed.float(), [w.float() for w in s["ws"]],
                                        [b.float() for b in s["bs"]], f(s["rw"]), f(s["rb"]))

    return Case(op="draft_head_mlp", label=dict(d=d, R=R, k=k, blocks=nb), nbytes=nbytes, flops=2 * R * w_elems,
                notes="all weights and biases + hidden + R k gathered embedding rows + path tokens + out; "
                      f"embed [V, d] ({vocab}). Target >= 2x eager and not slower than compile.",
                make_set=make_set, bytes_per_set=set_bytes, truth=truth,
                check=lambda out, ref: C.compare(out, ref, tol=3e-2),
                methods=_std_methods("draft_head_mlp", runner, lambda s: call(s, ops.draft_head_mlp),
                                     lambda s, impl=reference.draft_head_mlp: call(s, impl)))


# -- kv_compact ------------------------------------------------------------------------------------------------
def kv_compact_cases(sizes: Sizes, device, runner) -> list[Case]:
    from hydra_fast import ops, reference, tree

    tb = tree.Tree.from_choices(sizes.tree).buffers(device)
    paths = tb.paths.cpu()
    # the longest root-to-leaf path, preferring one whose nodes all move (node index != position)
    full = sorted(paths.tolist(), key=lambda p: (-sum(n >= 0 for n in p), -sum(n != j for j, n in enumerate(p) if n >= 0)))
    accepted = torch.tensor([full[0]], dtype=torch.long, device=device)  # [B, Lp]
    return [_kv_case(name, kv, sizes.kv_seq, tb.num_nodes, accepted, device, runner, ops, reference)
            for name, kv in sizes.kv.items()]


def _kv_case(name, kv: KvShape, S, N, accepted, device, runner, ops, reference) -> Case:
    B, Lp = accepted.shape
    moved = sum(1 for j, n in enumerate(accepted[0].tolist()) if n >= 0 and n != j)
    slot = kv.layers * B * kv.hkv * kv.d * BF16  # one position across all layers and heads, K or V
    nbytes = 2 * 2 * moved * slot  # K and V, read + write
    windows = max(1, S // N - 1)  # input set i: cache copy i // windows, cache_lens (i % windows) * N
    copies: dict[int, tuple] = {}

    def make_set(i):
        c = i // windows
        if c not in copies:  # small caches: more copies, so the rotating slots still exceed L2
            g = _gen(device, 5 + c)
            shape = (kv.layers, B, kv.hkv, S, kv.d)  # [L, B, Hkv, S, D]
            copies[c] = (_randn(shape, g, device), _randn(shape, g, device))
        k, v = copies[c]
        lens = torch.full((B,), (i % windows) * N, dtype=torch.int32, device=device)
        return dict(k=k, v=v, lens=lens, acc=accepted)

    def fresh(s):
        return dict(s, k=s["k"].clone(), v=s["v"].clone())

    def truth(s):
        reference.kv_compact(s["k"], s["v"], s["lens"], s["acc"])
        return s["k"], s["v"]

    def call(s, impl):
        return impl(s["k"], s["v"], s["lens"], s["acc"])

    return Case(op="kv_compact", label=dict(model=name, L=kv.layers, H=kv.hkv, D=kv.d), nbytes=nbytes, flops=0,
                notes=f"K and V slots that move (accepted {accepted[0].tolist()}: {moved} of {Lp}), read + write, "
                      f"S = {S}; input sets differ in cache_lens (windows of {N} slots) and cache copy. "
                      "Target <= 10 us.",
                make_set=make_set, bytes_per_set=max(nbytes, 1), alloc_per_set=2 * slot * S // windows,
                truth=truth, check=C.compare_exact, check_set=fresh, mutates=True,
                output_of=lambda s, out: (s["k"], s["v"]),
                methods=_std_methods("kv_compact", runner, lambda s: call(s, ops.kv_compact),
                                     lambda s, impl=reference.kv_compact: call(s, impl)))


BUILDERS = {
    "tree_attention": tree_attention_cases,
    "accept_greedy": accept_cases("accept_greedy"),
    "accept_typical": accept_cases("accept_typical"),
    "draft_head_mlp": draft_head_cases,
    "kv_compact": kv_compact_cases,
}

# The fused decoder-layer ops (rms_norm, add_rms_norm, silu_mul, rope_kv_write): cases in layer_op_cases.py.
from layer_op_cases import LAYER_BUILDERS  # noqa: E402

OPS = OPS + tuple(LAYER_BUILDERS)
BUILDERS.update(LAYER_BUILDERS)

# The dynamic draft tree's layout (dynamic_tree_layout): cases in layout_op_cases.py.
from layout_op_cases import LAYOUT_BUILDERS  # noqa: E402

OPS = OPS + tuple(LAYOUT_BUILDERS)
BUILDERS.update(LAYOUT_BUILDERS)

# The draft heads' top-k (topk_rows): cases in topk_op_cases.py.
from topk_op_cases import TOPK_BUILDERS  # noqa: E402

OPS = OPS + tuple(TOPK_BUILDERS)
BUILDERS.update(TOPK_BUILDERS)

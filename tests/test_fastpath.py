"""The fused decoder forward (``fastpath.py``) against the HF-module forward, which stays its specification."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from hydra_fast import ops, reference
from hydra_fast.engine import SpeculativeEngine
from hydra_fast.fastpath import FusedDecoder
from hydra_fast.heads import DraftHeads
from hydra_fast.model import HydraModel
from hydra_fast.rope_table import RopeTable
from hydra_fast.tree import Tree

from conftest import DEVICES
from test_engine import FAMILIES, KINDS, V, hf_greedy, perturbed_heads, tiny

IMPLS = [pytest.param(False, id="reference"),
         pytest.param(True, id="kernels", marks=pytest.mark.skipif(not ops.extension_loaded(),
                                                                     reason="hydra_fast._C is not built"))]


def storage_bytes(model: nn.Module) -> int:
    """Bytes of the distinct storages behind the model's parameters."""
    seen = {}
    for p in model.parameters():
        s = p.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def run_forward(engine: SpeculativeEngine, ids, pos, mask):
    hidden = engine._forward(ids, pos, mask)
    return hidden, engine.cache.k.clone(), engine.cache.v.clone()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("use_kernels", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_forward_matches_hf_modules(device, family, use_kernels, dtype):
    """Prefill, a tree forward, then a one-token step over the cache: hidden states and every cached K/V as the HF
    modules'."""
    base = tiny(family).to(device=device, dtype=dtype)
    fused, why = FusedDecoder.build(base)
    assert fused is not None, why
    tree = Tree.from_choices("mc_sim_7b_63")
    engines = [SpeculativeEngine(base, None, tree, 2, 96, use_kernels=use_kernels, fused=f) for f in (None, fused)]
    gen = torch.Generator().manual_seed(3)
    T, N = 13, tree.num_nodes
    prompt = torch.randint(0, V, (2, T), generator=gen).to(device)
    nodes = torch.randint(0, V, (2, N), generator=gen).to(device)
    outs = []
    for engine in engines:
        engine.cache.reset()
        pos = torch.arange(T, device=device).view(1, T).expand(2, T)
        h1 = run_forward(engine, prompt, pos, engine._causal(T))
        engine.cache.lens.copy_(torch.tensor([T, T - 4], dtype=torch.int32))  # ragged lengths
        tree_pos = engine.cache.lens.long().view(2, 1) + engine.bufs.depth.view(1, -1)
        h2 = run_forward(engine, nodes, tree_pos, engine.bufs.tree_mask)
        # one token per sequence (2 rows: on CUDA the GEMV kernels with their fused prologues)
        one = torch.ones(1, 1, dtype=torch.bool, device=device)
        h3 = run_forward(engine, nodes[:, 1:2], engine.cache.lens.long().view(2, 1), one)
        outs.append(h1 + h2 + h3)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    for hf, fast in zip(*outs):
        torch.testing.assert_close(fast.float(), hf.float(), **tol)


def test_fusing_keeps_memory_and_hf_outputs():
    base = tiny("qwen2")  # q/k/v biases are fused too
    ids = torch.randint(0, V, (1, 9))
    before_bytes = storage_bytes(base)
    before = base(ids).logits
    fused, why = FusedDecoder.build(base)
    assert fused is not None, why
    assert storage_bytes(base) == before_bytes  # the module weights are views of the fused buffers
    attn = base.model.layers[0].self_attn
    assert attn.k_proj.weight.untyped_storage().data_ptr() == fused.layers[0].qkv_weight.untyped_storage().data_ptr()
    assert attn.k_proj.bias.untyped_storage().data_ptr() == fused.layers[0].qkv_bias.untyped_storage().data_ptr()
    assert fused.is_current()
    torch.testing.assert_close(base(ids).logits, before, atol=0, rtol=0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("kind", KINDS)
def test_fast_and_hf_paths_give_hf_greedy_tokens(family, kind):
    base = tiny(family)
    ids = torch.randint(0, V, (1, 7))
    ref = hf_greedy(base, ids, 40)
    heads = perturbed_heads(base, kind)
    for fast in (False, True):
        model = HydraModel(base, heads, max_cache_len=192, fast=fast)
        out = model.generate(ids, max_new_tokens=40)
        assert (model._fused is not None) == fast, model.fast_path_reason
        assert isinstance(model._engine.rope, RopeTable) == fast  # the fast path gathers cos/sin from a table
        assert torch.equal(out, ref), f"fast={fast}"


def test_unrecognised_layer_falls_back_to_hf_modules():
    base = tiny("llama")
    base.model.layers[1].mlp.act_fn = nn.GELU()
    ids = torch.randint(0, V, (1, 8))
    ref = hf_greedy(base, ids, 24)
    model = HydraModel(base, None, max_cache_len=64)
    assert torch.equal(model.generate(ids, max_new_tokens=24), ref)
    assert model._fused is None and "GELU" in model.fast_path_reason
    assert type(base.model.layers[0].self_attn.q_proj.weight) is nn.Parameter
    assert base.model.layers[0].self_attn.q_proj.weight.untyped_storage().nbytes() == 64 * 64 * 4  # untouched


def test_replaced_weights_rebuild_the_fused_decoder():
    base = tiny("llama")
    ids = torch.randint(0, V, (1, 8))
    model = HydraModel(base, DraftHeads.from_base(base, "hydra"), max_cache_len=96)
    assert torch.equal(model.generate(ids, max_new_tokens=16), hf_greedy(base, ids, 16))
    first = model._fused
    other = tiny("llama", seed=5)
    base.load_state_dict(other.state_dict(), assign=True)  # new parameter objects: the old views are gone
    assert not first.is_current()
    out = model.generate(ids, max_new_tokens=16)
    assert model._fused is not first and model._fused.is_current()
    assert torch.equal(out, hf_greedy(base, ids, 16))


def test_reference_layer_ops_match_hf_modules():
    """The twins' rounding order is HF's: bit-identical to the HF RMSNorm and MLP modules in bf16."""
    base = tiny("qwen3").to(torch.bfloat16)
    layer = base.model.layers[0]
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    norm = layer.input_layernorm
    assert torch.equal(reference.rms_norm(x, norm.weight, norm.variance_epsilon), norm(x))
    r = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    normed, h = reference.add_rms_norm(x, r, norm.weight, norm.variance_epsilon)
    assert torch.equal(h, r + x) and torch.equal(normed, norm(r + x))
    mlp = layer.mlp
    gu = torch.cat([mlp.gate_proj(x), mlp.up_proj(x)], dim=-1)
    assert torch.equal(mlp.down_proj(reference.silu_mul(gu)), mlp(x))


def test_models_over_one_base_share_its_fused_decoder(monkeypatch):
    # a second HydraModel over the same base must not re-fuse the weights: that would make the first model's
    # decoder stale and every call of either model rebuild its decoder and engine
    from hydra_fast import fastpath

    base = tiny("llama")
    builds = []
    real = fastpath.FusedDecoder.build.__func__
    monkeypatch.setattr(fastpath.FusedDecoder, "build",
                        classmethod(lambda cls, b: builds.append(1) or real(cls, b)))
    ids = torch.randint(0, V, (1, 7))
    a, b = HydraModel(base, None, max_cache_len=64), HydraModel(base, None, max_cache_len=64)
    outs = [m.generate(ids, max_new_tokens=5) for m in (a, b, a, b)]
    assert all(torch.equal(o, outs[0]) for o in outs) and torch.equal(outs[0], hf_greedy(base, ids, 5))
    assert len(builds) == 1 and a._fused is b._fused and a._fused.is_current()
    engine = a._engine
    a.generate(ids, max_new_tokens=5)
    assert a._engine is engine  # no rebuild between calls

"""The rotary table (``rope_table.py``): its rows are the rotary module's output bit for bit, the fused engine
gathers from it instead of calling the module, and rope types that are not static keep calling the module."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from hydra_fast.engine import SpeculativeEngine
from hydra_fast.fastpath import FusedDecoder
from hydra_fast.model import HydraModel
from hydra_fast.rope_table import RopeTable, not_tabulable, rotary_positions
from hydra_fast.tree import Tree

from conftest import DEVICES, cuda_ready
from test_engine import FAMILIES, V, hf_greedy, perturbed_heads, tiny

STATIC = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256, "rope_theta": 500000.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256, "rope_theta": 10000.0},
}
DYNAMIC = {  # frequencies that change with the longest position of a call
    "dynamic": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
    "longrope": {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8, "factor": 4.0,
                 "original_max_position_embeddings": 256, "rope_theta": 10000.0},
}


def tiny_rope(family: str, rope: str, seed: int = 0):
    """The tiny model of ``family`` (test_engine.FAMILIES) with the rope parameters ``rope``."""
    base = tiny(family)
    cfg = base.config.to_dict()
    cfg["rope_parameters"] = dict({**STATIC, **DYNAMIC}[rope])
    torch.manual_seed(seed)
    return type(base)(type(base.config)(**cfg)).eval()


class CallCounter:
    """Counts calls of a module (a forward hook) while used as a context."""

    def __init__(self, module: nn.Module):
        self.module, self.calls = module, 0

    def __enter__(self):
        self.handle = self.module.register_forward_hook(lambda *_: setattr(self, "calls", self.calls + 1))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("rope", sorted(STATIC))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_table_rows_are_the_rotary_output_bitwise(device, family, rope, dtype):
    rotary = tiny_rope(family, rope).model.rotary_emb.to(device)
    assert rotary.rope_type == rope and not_tabulable(rotary) == ""
    S = 700
    table = rotary_positions(rotary, S, dtype, torch.device(device))
    assert isinstance(table, RopeTable) and table.table.shape == (2, S, rotary.inv_freq.numel() * 2)
    g = torch.Generator().manual_seed(1)
    cases = [torch.randint(0, S, (B, N), generator=g) for B, N in ((1, 1), (2, 63), (3, 7), (1, 111))]
    cases.append(torch.arange(S).view(1, S).expand(2, S))  # a prefill's positions: expanded, every row
    cases.append(torch.randint(0, S, (2, 40), generator=g)[:, ::2])  # strided
    for pos in cases:
        pos = pos.to(device)
        hidden = torch.randn(*pos.shape, 64, generator=g).to(device=device, dtype=dtype)
        got, want = table(hidden, pos), rotary(hidden, pos)
        for a, b in zip(got, want):
            assert a.dtype == b.dtype == dtype and a.shape == b.shape
            assert torch.equal(a, b), (tuple(pos.shape), (a.float() - b.float()).abs().max().item())


def test_positions_past_capacity_read_the_last_row_and_other_dtypes_call_the_module():
    rotary = tiny_rope("llama", "yarn").model.rotary_emb
    table = RopeTable(rotary, 50, torch.float32, torch.device("cpu"))
    pos = torch.tensor([[48, 49, 50, 73]])
    cos, sin = table(torch.randn(1, 4, 64), pos)
    last = rotary(torch.randn(1, 1, 64), torch.tensor([[49]]))
    assert torch.equal(cos[0, 2:], last[0][0].expand(2, -1)) and torch.equal(sin[0, 2:], last[1][0].expand(2, -1))
    assert torch.equal(cos[0, :2], rotary(torch.randn(1, 2, 64), pos[:, :2])[0][0])
    with CallCounter(rotary) as counter:
        cos16, _ = table(torch.randn(1, 4, 64, dtype=torch.float16), pos)
    assert counter.calls == 1 and cos16.dtype == torch.float16
    assert torch.equal(cos16, rotary(cos16, pos)[0])


@pytest.mark.parametrize("rope", sorted(DYNAMIC))
def test_dynamic_rope_types_keep_calling_the_module(rope):
    base = tiny_rope("llama", rope)
    rotary = base.model.rotary_emb
    assert rope in not_tabulable(rotary)
    assert rotary_positions(rotary, 64, torch.float32, torch.device("cpu")) is rotary
    with pytest.raises(ValueError, match="call the module instead"):
        RopeTable(rotary, 64, torch.float32, torch.device("cpu"))
    ids = torch.randint(0, V, (1, 7))
    ref = hf_greedy(base, ids, 24)  # positions stay below every threshold of these types: HF's values throughout
    model = HydraModel(base, perturbed_heads(base, "hydra++"), max_cache_len=128)
    model.generate(ids, max_new_tokens=4)
    assert model._fused is not None and model._engine.rope is rotary
    with CallCounter(rotary) as counter:
        out = model.generate(ids, max_new_tokens=24, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    steps = len(out.accept_lengths[0])
    assert counter.calls == 2 * (steps + 1)  # the backbone and the prefix layer, in the prefill and every step


@pytest.mark.parametrize("rope", ["default", "yarn"])
@pytest.mark.parametrize("kind", ["hydra", "hydra++"])
def test_fused_engine_gathers_from_the_table_and_equals_hf_greedy(rope, kind):
    base = tiny_rope("qwen3", rope)
    rotary = base.model.rotary_emb
    ids = torch.randint(0, V, (1, 9))
    ref = hf_greedy(base, ids, 40)
    model = HydraModel(base, perturbed_heads(base, kind), max_cache_len=160)
    with CallCounter(rotary) as counter:
        first = model.generate(ids, max_new_tokens=40)
    assert counter.calls == 1  # the table's build; no call in the prefill or any step
    assert isinstance(model._engine.rope, RopeTable) and model._engine.rope.capacity == 160
    with CallCounter(rotary) as counter:
        again = model.generate(ids, max_new_tokens=40)
    assert counter.calls == 0
    assert torch.equal(first, ref) and torch.equal(again, ref)
    hf = HydraModel(base, perturbed_heads(base, kind), max_cache_len=160, fast=False)
    assert torch.equal(hf.generate(ids, max_new_tokens=40), ref)
    assert hf._engine.fused is None and hf._engine.rope is rotary  # the HF path calls the module, as before


@pytest.mark.parametrize("prefix", ["fused", "hf-modules"])
def test_engine_state_with_the_table_is_the_modules_bit_for_bit(prefix):
    # greedy output does not see the prefix layer (it only drafts): compare the heads' input and every cache
    base = tiny_rope("llama", "llama3")
    fused, why = FusedDecoder.build(base)
    assert fused is not None, why
    heads = perturbed_heads(base, "hydra++")
    if prefix == "hf-modules":
        heads.prefix_layer.mlp.act_fn = nn.GELU()  # a layer the fused path does not reproduce
    tree = Tree.from_choices("mc_sim_7b_63")
    engines = [SpeculativeEngine(base, heads, tree, 2, 128, fused=fused) for _ in range(2)]
    engines[1].rope = base.model.rotary_emb
    assert isinstance(engines[0].rope, RopeTable)
    assert (engines[0].fused_prefix is None) == (prefix == "hf-modules")
    prompt = torch.randint(0, V, (2, 11), generator=torch.Generator().manual_seed(2))
    states = []
    for engine in engines:
        engine.prefill(prompt, torch.tensor([11, 6]))
        results = [engine.step().clone() for _ in range(6)]
        states.append([*results, engine.hidden, engine.cache.k, engine.cache.v, engine.prefix_cache.k,
                       engine.prefix_cache.v, engine.cache.lens])
    for a, b in zip(*states):
        assert torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_ready(), reason="needs a CUDA device and hydra_fast._C built with CUDA")
@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("rope", ["default", "yarn"])
def test_table_in_a_cuda_graph_matches_hf_and_accepts_exactly(family, rope, monkeypatch):
    from oracle_heads import OracleHeads, bind, true_sequences
    from test_cuda_engine import GraphCounter
    from hydra_fast.heads import DraftHeads

    base = tiny_rope(family, rope).cuda()
    ids = torch.randint(0, V, (1, 9), device="cuda")
    n, depth = 41, Tree.from_choices("mc_sim_7b_63").max_depth
    oracle = OracleHeads(DraftHeads.from_base(base, "hydra++"), true_sequences(base, [ids], n), 3).to("cuda")
    graphs = GraphCounter(monkeypatch)
    with bind(oracle), CallCounter(base.model.rotary_emb) as counter:
        model = HydraModel(base, oracle, max_cache_len=192, tree="mc_sim_7b_63")
        out = model.generate(ids, max_new_tokens=n, return_dict_in_generate=True)
        again = model.generate(ids, max_new_tokens=n)
    assert isinstance(model._engine.rope, RopeTable) and model._engine.rope.table.is_cuda
    assert counter.calls == 1  # built once, before the step's capture; the graphs gather from it
    assert torch.equal(out.sequences, hf_greedy(base, ids, n)) and torch.equal(again, out.sequences)
    assert out.accept_lengths == oracle.expected_accept_lengths(n, depth) == [[4] * 10]
    assert graphs.captures == 2 and graphs.replays == 2 * (10 + 1)

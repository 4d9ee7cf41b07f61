"""The decoding engine end to end on tiny random models of each supported family (CPU, fp32).

Greedy speculative output must equal HF ``generate(do_sample=False)`` token for token, whatever the heads
draft: untrained heads, perturbed heads (drafts that are mostly wrong) and oracle drafts (mostly right,
so many tokens are accepted per step and the stopping logic is exercised mid-step).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM, StoppingCriteria, StoppingCriteriaList)

from hydra_fast.engine import SamplingConfig
from hydra_fast.heads import DraftHeads
from hydra_fast.model import HydraModel

V = 211
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=V, max_position_embeddings=1024)
FAMILIES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**COMMON)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**COMMON)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(head_dim=16, **COMMON)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(sliding_window=None, **COMMON)),
}
KINDS = ("medusa", "hydra", "hydra++")


def tiny(family: str, seed: int = 0):
    torch.manual_seed(seed)
    return FAMILIES[family]().eval()


def hf_greedy(base, ids, n, **kw):
    return base.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=kw.pop("eos_token_id", None),
                         pad_token_id=0, **kw)


def perturbed_heads(base, kind, seed=1):
    heads = DraftHeads.from_base(base, kind)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return heads


class OracleHeads(torch.nn.Module):
    """Drafts the true greedy continuation (read from a reference run) at rank-0 nodes, garbage elsewhere.

    Test-only: reads the cache length back to the host, so it runs eagerly (CPU)."""

    def __init__(self, real_heads, continuation: torch.Tensor, prompt_len: int, wrong_after: int = 99):
        super().__init__()
        self.real = real_heads
        self.prefix_layer = real_heads.prefix_layer
        self.config = real_heads.config
        self.cont = continuation  # [T_total] the reference sequence
        self.prompt_len = prompt_len
        self.wrong_after = wrong_after
        self.engine = None

    def prepare_draft(self, lm_head):
        self.real.prepare_draft(lm_head)

    def draft(self, hidden, root, bufs, embed_weight, lm_head, impl):
        cand = self.real.draft(hidden, root, bufs, embed_weight, lm_head, impl).clone()
        pos = int(self.engine.cache.lens[0])  # the root's position
        for n in range(1, bufs.depth.numel()):
            path = [int(x) for x in bufs.node_paths[n] if x >= 0]
            depth = len(path) - 1
            on_main = all(int(bufs.ranks[m]) == 0 for m in path[1:])
            idx = pos + depth
            if on_main and depth <= self.wrong_after and idx < self.cont.numel():
                cand[0, n] = self.cont[idx]
            elif idx < self.cont.numel():
                cand[0, n] = (self.cont[idx] + 1 + n) % V  # surely wrong
        return cand


def with_oracle(model):
    """Build the greedy batch-1 engine now and let the oracle heads read its cache length."""
    model.heads.engine = model._get_engine(1, model.default_tree, SamplingConfig(), True)[0]
    return model


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("use_kernels", [False, True], ids=["reference", "kernels"])
def test_plain_decoding_matches_hf(family, use_kernels):
    base = tiny(family)
    ids = torch.randint(0, V, (1, 11))
    ref = hf_greedy(base, ids, 40)
    out = HydraModel(base, None, max_cache_len=128, use_kernels=use_kernels).generate(ids, max_new_tokens=40)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("kind", KINDS)
def test_heads_greedy_matches_hf(family, kind):
    base = tiny(family)
    ids = torch.randint(0, V, (1, 7))
    ref = hf_greedy(base, ids, 48)
    model = HydraModel(base, perturbed_heads(base, kind), max_cache_len=192)
    out = model.generate(ids, max_new_tokens=48, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    steps = out.accept_lengths[0]  # tokens each step produced; the last step may overshoot and is cut
    assert sum(steps[:-1]) < 47 <= sum(steps)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("wrong_after", [1, 3, 99])
def test_oracle_drafts_accept_many_and_stay_exact(kind, wrong_after):
    base = tiny("llama")
    ids = torch.randint(0, V, (1, 9))
    ref = hf_greedy(base, ids, 80)
    heads = OracleHeads(DraftHeads.from_base(base, kind), ref[0], 9, wrong_after)
    model = with_oracle(HydraModel(base, heads, max_cache_len=256, tree="mc_sim_7b_63", cuda_graph=False))
    out = model.generate(ids, max_new_tokens=80, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    steps = out.accept_lengths[0]
    assert max(steps) == min(wrong_after, 4) + 1  # depth-4 tree: at most 4 drafts + 1 per step
    if wrong_after == 99:
        assert sum(steps) / len(steps) > 4.0


def test_stops_exactly_at_eos_inside_a_step():
    base = tiny("llama")
    ids = torch.randint(0, V, (1, 9))
    ref = hf_greedy(base, ids, 60)
    eos = int(ref[0, 9 + 22])  # a token the reference emits mid-way
    first = next(i for i in range(9, ref.shape[1]) if int(ref[0, i]) == eos)
    heads = OracleHeads(DraftHeads.from_base(base, "hydra"), ref[0], 9)
    model = with_oracle(HydraModel(base, heads, max_cache_len=256, cuda_graph=False))
    out = model.generate(ids, max_new_tokens=60, eos_token_id=eos)
    hf = hf_greedy(base, ids, 60, eos_token_id=eos)
    assert torch.equal(out, hf)
    assert out.shape[1] == first + 1 and int(out[0, -1]) == eos


def test_stops_exactly_at_max_new_tokens_and_criteria():
    base = tiny("qwen2")
    ids = torch.randint(0, V, (1, 5))
    ref = hf_greedy(base, ids, 30)
    heads = OracleHeads(DraftHeads.from_base(base, "medusa"), ref[0], 5)
    model = with_oracle(HydraModel(base, heads, max_cache_len=128, cuda_graph=False))
    for n in (1, 2, 5, 13):
        assert torch.equal(model.generate(ids, max_new_tokens=n), ref[:, : 5 + n])

    class StopAtLength(StoppingCriteria):
        def __call__(self, input_ids, scores, **kw):
            return torch.tensor([input_ids.shape[1] >= 5 + 17])

    out = model.generate(ids, max_new_tokens=30, stopping_criteria=StoppingCriteriaList([StopAtLength()]))
    assert torch.equal(out, ref[:, : 5 + 17])


def test_batch_with_left_padding_matches_per_row_hf():
    base = tiny("llama")
    a = torch.randint(1, V, (1, 6))
    b = torch.randint(1, V, (1, 10))
    ids = torch.zeros(2, 10, dtype=torch.long)
    mask = torch.zeros(2, 10, dtype=torch.long)
    ids[0, 4:], mask[0, 4:] = a[0], 1
    ids[1], mask[1] = b[0], 1
    model = HydraModel(base, perturbed_heads(base, "hydra"), max_cache_len=128)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=20)
    assert torch.equal(out[0, 10:], hf_greedy(base, a, 20)[0, 6:])
    assert torch.equal(out[1, 10:], hf_greedy(base, b, 20)[0, 10:])


def test_streamer_receives_the_generated_tokens():
    base = tiny("llama")
    ids = torch.randint(0, V, (1, 6))

    class Collect:
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.reshape(-1).tolist())

        def end(self):
            self.ended = True

    streamer = Collect()
    out = HydraModel(base, perturbed_heads(base, "hydra++"), max_cache_len=128).generate(
        ids, max_new_tokens=25, streamer=streamer)
    assert streamer.ended and streamer.chunks[0] == ids[0].tolist()
    assert sum(streamer.chunks[1:], []) == out[0, 6:].tolist()


def test_sampling_runs_and_is_seeded():
    base = tiny("llama")
    ids = torch.randint(0, V, (1, 6))
    model = HydraModel(base, perturbed_heads(base, "hydra"), max_cache_len=128)
    torch.manual_seed(3)
    a = model.generate(ids, max_new_tokens=20, do_sample=True, temperature=0.8)
    torch.manual_seed(3)
    b = model.generate(ids, max_new_tokens=20, do_sample=True, temperature=0.8)
    assert torch.equal(a, b) and a.shape == (1, 26)


def _compiled_step_equals_hf() -> bool:
    base = tiny("llama")
    ids = torch.randint(0, V, (1, 7))
    ref = hf_greedy(base, ids, 24)
    model = HydraModel(base, perturbed_heads(base, "hydra++"), max_cache_len=128, compile=True)
    return torch.equal(model.generate(ids, max_new_tokens=24), ref)


@pytest.mark.slow
def test_compiled_step_matches_hf():
    # Its own process, with inductor's caches off: a cached graph from an earlier run would skip the
    # scheduler, where a step compiled with kv_compact inside once failed (KeyError 'op<n>', see StepRunner).
    import os
    import subprocess
    import sys

    code = "import test_engine, sys; sys.exit(0 if test_engine._compiled_step_equals_hf() else 3)"
    env = dict(os.environ, TORCHINDUCTOR_FORCE_DISABLE_CACHES="1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_top_p_nucleus_of_one_token_samples_the_greedy_output():
    # top_p -> 0 keeps only the most likely token: sampling and typical acceptance then reduce to greedy.
    base = tiny("llama")
    ids = torch.randint(0, V, (1, 7))
    ref = hf_greedy(base, ids, 30)
    model = HydraModel(base, perturbed_heads(base, "hydra"), max_cache_len=128)
    for seed in (0, 1):
        torch.manual_seed(seed)
        assert torch.equal(model.generate(ids, max_new_tokens=30, do_sample=True, temperature=0.7, top_p=1e-6), ref)


def test_top_p_filter_keeps_the_nucleus():
    from hydra_fast.engine import top_p_filter

    logits = torch.log(torch.tensor([[0.5, 0.05, 0.3, 0.15]]))
    probs = torch.softmax(top_p_filter(logits, 1.0, 0.75) / 1.0, dim=-1)
    torch.testing.assert_close(probs, torch.tensor([[0.625, 0.0, 0.375, 0.0]]))
    probs = torch.softmax(top_p_filter(logits, 1.0, 0.85) / 1.0, dim=-1)  # 0.5 + 0.3 < 0.85: 0.15 joins
    torch.testing.assert_close(probs, torch.tensor([[0.5, 0.0, 0.3, 0.15]]) / 0.95)

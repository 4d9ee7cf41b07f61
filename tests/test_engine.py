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

from hydra_fast.heads import DraftHeads
from hydra_fast.model import HydraModel
from hydra_fast.tree import Tree
from oracle_heads import OracleHeads, bind, padded_batch, true_sequences

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
DEPTH = Tree.from_choices("mc_sim_7b_63").max_depth  # 4: the oracle tests' tree


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
    # perturbed heads: drafts that are mostly wrong; the output must not depend on them
    base = tiny(family)
    ids = torch.randint(0, V, (1, 7))
    ref = hf_greedy(base, ids, 48)
    model = HydraModel(base, perturbed_heads(base, kind), max_cache_len=192)
    out = model.generate(ids, max_new_tokens=48, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    steps = out.accept_lengths[0]  # tokens each step produced; the last step may overshoot and is cut
    assert sum(steps[:-1]) < 47 <= sum(steps)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("kind", KINDS)
def test_oracle_heads_greedy_matches_hf_and_accepts_every_right_draft(family, kind):
    # oracle heads: the rank-0 chain is right, so every step accepts the whole chain (4 drafts + 1 token)
    base = tiny(family)
    ids = torch.randint(0, V, (1, 7))
    n = 41
    oracle = OracleHeads(DraftHeads.from_base(base, kind), true_sequences(base, [ids], n))
    with bind(oracle):
        model = HydraModel(base, oracle, max_cache_len=192, tree="mc_sim_7b_63")
        out = model.generate(ids, max_new_tokens=n, return_dict_in_generate=True)
    assert torch.equal(out.sequences, hf_greedy(base, ids, n))
    assert out.accept_lengths == oracle.expected_accept_lengths(n, DEPTH) == [[5] * 8]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("wrong_after", [0, 1, 3, 99])
def test_oracle_drafts_accept_exactly_and_stay_exact(kind, wrong_after):
    base = tiny("llama")
    ids = torch.randint(0, V, (1, 9))
    n = 48
    oracle = OracleHeads(DraftHeads.from_base(base, kind), true_sequences(base, [ids], n), wrong_after)
    with bind(oracle):
        model = HydraModel(base, oracle, max_cache_len=256, tree="mc_sim_7b_63")
        out = model.generate(ids, max_new_tokens=n, return_dict_in_generate=True)
    assert torch.equal(out.sequences, hf_greedy(base, ids, n))
    assert out.accept_lengths == oracle.expected_accept_lengths(n, DEPTH)
    assert set(out.accept_lengths[0]) == {min(wrong_after, DEPTH) + 1}


def check_padded_batch(base, kind, prompts, n, wrong_after, side):
    """Generate for ``prompts`` padded on ``side`` with oracle heads; assert each row equals HF batch-1 greedy of
    its unpadded prompt and accepts exactly as far as its oracle is right. -> the generate output."""
    oracle = OracleHeads(DraftHeads.from_base(base, kind), true_sequences(base, prompts, n), wrong_after)
    oracle.to(base.device)
    ids, mask = padded_batch(prompts, side)
    with bind(oracle):
        model = HydraModel(base, oracle, max_cache_len=128, tree="mc_sim_7b_63")
        out = model.generate(ids, attention_mask=mask, max_new_tokens=n, return_dict_in_generate=True)
    T = ids.shape[1]
    for b, p in enumerate(prompts):
        assert torch.equal(out.sequences[b, :T], ids[b])
        assert torch.equal(out.sequences[b, T:], hf_greedy(base, p, n)[0, p.shape[1]:]), (side, b)
    assert out.accept_lengths == oracle.expected_accept_lengths(n, DEPTH)
    return out


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("kind", KINDS)
def test_batch_with_padding_accepts_exactly_per_row(side, kind):
    # rows of different lengths and different acceptance (0, 2, 4, 1 drafts a step): each row equals HF
    # batch-1 greedy of its unpadded prompt and accepts exactly its own number of drafts every step
    base = tiny("qwen3")
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, V, (1, n), generator=g) for n in (6, 13, 3, 9)]
    out = check_padded_batch(base, kind, prompts, 23, [0, 2, 99, 1], side)
    assert [set(a) for a in out.accept_lengths] == [{1}, {3}, {5}, {2}]


def test_stops_exactly_at_eos_inside_a_step():
    base = tiny("llama")
    ids = torch.randint(0, V, (1, 9))
    ref = hf_greedy(base, ids, 60)
    eos = int(ref[0, 9 + 22])  # a token the reference emits mid-way
    first = next(i for i in range(9, ref.shape[1]) if int(ref[0, i]) == eos)
    oracle = OracleHeads(DraftHeads.from_base(base, "hydra"), [ref[0].tolist()])
    with bind(oracle):
        out = HydraModel(base, oracle, max_cache_len=256).generate(ids, max_new_tokens=60, eos_token_id=eos)
    hf = hf_greedy(base, ids, 60, eos_token_id=eos)
    assert torch.equal(out, hf)
    assert out.shape[1] == first + 1 and int(out[0, -1]) == eos


def test_stops_exactly_at_max_new_tokens_and_criteria():
    base = tiny("qwen2")
    ids = torch.randint(0, V, (1, 5))
    ref = hf_greedy(base, ids, 30)
    oracle = OracleHeads(DraftHeads.from_base(base, "medusa"), [ref[0].tolist()])
    with bind(oracle):
        model = HydraModel(base, oracle, max_cache_len=128)
        model.generate(ids, max_new_tokens=2)  # builds the engine while bound
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


def run_without_inductor_caches(code: str, timeout: int = 900) -> None:
    """Run ``code`` in a fresh Python process in tests/ with inductor's caches off and assert it exits 0.

    A cached graph from an earlier run would skip inductor's scheduler, where a step compiled with kv_compact
    inside once failed (KeyError 'op<n>', see StepRunner); the timeout only guards against a hang."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, TORCHINDUCTOR_FORCE_DISABLE_CACHES="1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow
def test_compiled_step_matches_hf():
    run_without_inductor_caches("import sys, test_engine as t; sys.exit(0 if t._compiled_step_equals_hf() else 3)")


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

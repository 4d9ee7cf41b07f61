"""The CUDA engine: graph capture and replay, the compiled step, bf16 decoding, the real model (marked cuda).

Run on a GPU machine with the extension built with CUDA: ``python -m pytest tests/test_cuda_engine.py -m cuda``
(``scripts/gpu_bench.sh`` runs them). Each greedy test in fp32 checks two things: the output equals HF
greedy token for token, and oracle heads (tests/oracle_heads.py) were accepted exactly as far as they
were right, so a verifier that accepts nothing fails. ``HYDRA_FAST_TEST_MODEL`` (an HF folder of
SmolLM2-135M-Instruct; default: hydra_fast.hub) and ``HYDRA_FAST_TEST_PROMPTS`` (MT-Bench jsonl) select the
real model's inputs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import cuda_ready
from hydra_fast.heads import DraftHeads
from hydra_fast.model import HydraModel
from hydra_fast.tree import Tree
from oracle_heads import OracleHeads, bind, true_sequences
from test_engine import FAMILIES, KINDS, V, check_padded_batch, hf_greedy, run_without_inductor_caches, tiny

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not cuda_ready(), reason="needs a CUDA device and hydra_fast._C built with CUDA")]
DEPTH = Tree.from_choices("mc_sim_7b_63").max_depth
MT_BENCH = Path(os.environ.get("HYDRA_FAST_TEST_PROMPTS",
                               Path(__file__).resolve().parents[2] / "shared" / "data" / "mt_bench.jsonl"))


class GraphCounter:
    """Counts CUDA-graph captures and replays (torch.cuda.CUDAGraph) while installed with monkeypatch."""

    def __init__(self, monkeypatch):
        self.captures = self.replays = 0
        begin, replay = torch.cuda.CUDAGraph.capture_begin, torch.cuda.CUDAGraph.replay

        def counted_begin(graph, *a, **k):
            self.captures += 1
            return begin(graph, *a, **k)

        def counted_replay(graph, *a, **k):
            self.replays += 1
            return replay(graph, *a, **k)

        monkeypatch.setattr(torch.cuda.CUDAGraph, "capture_begin", counted_begin)
        monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", counted_replay)


def tiny_cuda(family: str, dtype=torch.float32):
    return tiny(family).to(device="cuda", dtype=dtype)


def oracle_for(base, kind, prompts, n, wrong_after=99):
    heads = DraftHeads.from_base(base, kind)
    return OracleHeads(heads, true_sequences(base, prompts, n), wrong_after).to("cuda")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_plain_decoding_in_a_graph_matches_hf(family, monkeypatch):
    base = tiny_cuda(family)
    ids = torch.randint(0, V, (1, 11), device="cuda")
    graphs = GraphCounter(monkeypatch)
    out = HydraModel(base, None, max_cache_len=128).generate(ids, max_new_tokens=40, return_dict_in_generate=True)
    assert torch.equal(out.sequences, hf_greedy(base, ids, 40))
    # the step and the prefill (11 tokens, padded to 16) are each captured once and replayed
    assert graphs.captures == 2 and graphs.replays == len(out.accept_lengths[0]) + 1 == 40


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("kind", KINDS)
def test_heads_in_a_graph_match_hf_and_accept_exactly(family, kind, monkeypatch):
    base = tiny_cuda(family)
    ids = torch.randint(0, V, (1, 9), device="cuda")
    n = 41
    oracle = oracle_for(base, kind, [ids], n, wrong_after=3)
    graphs = GraphCounter(monkeypatch)
    with bind(oracle):
        model = HydraModel(base, oracle, max_cache_len=192, tree="mc_sim_7b_63")
        out = model.generate(ids, max_new_tokens=n, return_dict_in_generate=True)
    assert torch.equal(out.sequences, hf_greedy(base, ids, n))
    assert out.accept_lengths == oracle.expected_accept_lengths(n, DEPTH) == [[4] * 10]
    assert graphs.captures == 2 and graphs.replays == 10 + 1  # the step's graph and the prefill's


def test_programmatic_dependent_launch_changes_no_bit():
    # The fused step's kernels launch with programmatic dependent launch on sm_90+ (HYDRA_FAST_PDL=0 turns it
    # off): each waits for the kernel before it, so the tokens, the accept lengths and every cache value must be
    # the same with and without it, in bf16 (tensor-core attention, split KV) and fp32.
    runs = {}
    for flag in ("0", "1"):
        env = dict(os.environ, HYDRA_FAST_PDL=flag)
        proc = subprocess.run([sys.executable, str(Path(__file__).with_name("pdl_probe.py"))], env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[flag] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert runs["0"] == runs["1"]
    for dtype, r in runs["1"].items():
        assert r["fused"], dtype
        assert max(r["accept"]) > 1, (dtype, r["accept"])  # drafts were accepted: the tree step ran


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_in_a_graph_with_padding(side):
    base = tiny_cuda("llama")
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(1, V, (1, n), generator=g).cuda() for n in (5, 12, 8)]
    out = check_padded_batch(base, "hydra++", prompts, 30, [1, 99, 0], side)
    assert [set(a) for a in out.accept_lengths] == [{2}, {5}, {1}]


def test_one_graph_replays_across_prompts_and_cache_lengths(monkeypatch):
    # one step capture, then replays at whatever cache length each prompt and step leaves: lengths live on the
    # device; the prefill is captured once per padded length (3, 40, 17, 90 tokens -> 16, 64, 32, 96)
    base = tiny_cuda("mistral")
    base.generation_config.eos_token_id = None  # random weights: run every prompt to max_new_tokens, as HF below
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, V, (1, n), generator=g).cuda() for n in (3, 40, 17, 90)]
    news = (60, 7, 33, 100)
    truth = [true_sequences(base, [ids], n)[0] for ids, n in zip(prompts, news)]
    longest = max(truth, key=len)
    oracle = OracleHeads(DraftHeads.from_base(base, "hydra"), [longest]).to("cuda")
    graphs = GraphCounter(monkeypatch)
    with bind(oracle):
        model = HydraModel(base, oracle, max_cache_len=320, tree="mc_sim_7b_63")
        steps = 0
        for ids, n, seq in zip(prompts, news, truth):
            oracle.reload([seq])
            out = model.generate(ids, max_new_tokens=n, return_dict_in_generate=True)
            assert torch.equal(out.sequences, hf_greedy(base, ids, n)), ids.shape
            assert out.accept_lengths == oracle.expected_accept_lengths(n, DEPTH)
            steps += len(out.accept_lengths[0])
    assert graphs.captures == 1 + 4 and graphs.replays == steps + len(prompts)
    again = model.generate(prompts[2], max_new_tokens=5)  # a captured length: no new capture
    assert torch.equal(again, hf_greedy(base, prompts[2], 5)) and graphs.captures == 5


@pytest.mark.parametrize("do_sample", [False, True])
def test_captured_prefill_leaves_the_eager_prefills_state(do_sample):
    # the graph pads the prompts to the bucket's length; the state a step reads must be the eager prefill's
    from hydra_fast import generate as gen
    from hydra_fast.engine import PREFILL_BUCKETS, SamplingConfig, SpeculativeEngine, StepRunner

    base = tiny_cuda("qwen3")
    heads = DraftHeads.from_base(base, "hydra++").cuda()
    tree = Tree.from_choices("tiny").with_context(4)
    sampling = SamplingConfig(True, 0.8, top_k=20) if do_sample else SamplingConfig()
    engine = SpeculativeEngine(base, heads, tree, 2, 256, sampling)
    runner = StepRunner(engine)
    g = torch.Generator().manual_seed(11)
    for lens in [(5, 13), (40, 33), (100, 7)]:
        ids = torch.randint(1, V, (2, max(lens)), generator=g)
        mask = (torch.arange(max(lens)).view(1, -1) < torch.tensor(lens).view(2, 1)).long()
        prompts = gen.prepare_prompts(ids, mask, V)
        T = prompts.ids.shape[1]
        assert T not in PREFILL_BUCKETS  # the graph runs a padded prompt
        states = []
        for prefill in (engine.prefill, runner.prefill):
            engine.reseed(5)
            first = prefill(prompts.ids.cuda(), prompts.lengths).clone()
            kv = [torch.cat([engine.cache.k[:, b, :, :n], engine.cache.v[:, b, :, :n]]) for b, n in enumerate(lens)]
            pre = [engine.prefix_cache.k[:, b, :, :n].clone() for b, n in enumerate(lens)]
            hist = [engine.history[b, : n + 1].clone() for b, n in enumerate(lens)]
            states.append((first, engine.root.clone(), engine.hidden.clone(), engine.cache.lens.clone(), kv, pre,
                           hist))
        (f0, r0, h0, l0, kv0, p0, s0), (f1, r1, h1, l1, kv1, p1, s1) = states
        assert torch.equal(l0, l1) and l0.tolist() == list(lens)
        torch.testing.assert_close(h0, h1, rtol=1e-5, atol=1e-5)
        for a, b in zip(kv0 + p0, kv1 + p1):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert torch.equal(f0, f1) and torch.equal(r0, r1) and all(torch.equal(a, b) for a, b in zip(s0, s1))
    assert sorted(runner.prefill_graphs) == [16, 64, 128]


def _compiled_step_on_cuda_matches_hf() -> None:
    # in its own process (inductor caches off), as tests/test_engine.py::test_compiled_step_matches_hf
    base = tiny_cuda("llama")
    ids = torch.randint(0, V, (1, 7), device="cuda")
    n = 33
    for kind in (None, "hydra++", "medusa"):
        if kind is None:
            model = HydraModel(base, None, max_cache_len=128, compile=True)
            assert torch.equal(model.generate(ids, max_new_tokens=n), hf_greedy(base, ids, n))
            continue
        oracle = oracle_for(base, kind, [ids], n, wrong_after=2)
        with bind(oracle):
            model = HydraModel(base, oracle, max_cache_len=128, tree="mc_sim_7b_63", compile=True)
            out = model.generate(ids, max_new_tokens=n, return_dict_in_generate=True)
        assert torch.equal(out.sequences, hf_greedy(base, ids, n)), kind
        assert out.accept_lengths == oracle.expected_accept_lengths(n, DEPTH) == [[3] * 11], kind


def test_compiled_step_in_a_graph_matches_hf_and_accepts_exactly():
    run_without_inductor_caches("import test_cuda_engine as t; t._compiled_step_on_cuda_matches_hf()")


@pytest.mark.parametrize("kind", [None, "hydra++"])
def test_bf16_differs_from_hf_only_at_near_ties(kind):
    # bf16: the tree verify and HF's one-token forward round differently. Where the outputs part, HF's own
    # logits there must rank our token within bf16 rounding of its top token.
    base = tiny_cuda("llama", torch.bfloat16)
    heads = DraftHeads.from_base(base, kind).to("cuda", torch.bfloat16) if kind else None
    model = HydraModel(base, heads, max_cache_len=256)
    g = torch.Generator().manual_seed(11)
    for _ in range(4):
        ids = torch.randint(0, V, (1, 13), generator=g).cuda()
        out = model.generate(ids, max_new_tokens=64)[0]
        ref = hf_greedy(base, ids, 64)[0]
        n = min(out.numel(), ref.numel())  # a near-tie can pick an end token the other run did not
        diff = (out[:n] != ref[:n]).nonzero()
        if diff.numel() == 0:
            continue
        i = int(diff[0])
        with torch.no_grad():
            logits = base(out[None, :i]).logits[0, -1].float()  # HF's logits at the first divergence
        gap = float(logits.max() - logits[out[i]])
        assert gap <= 0.02 + 0.02 * float(logits.abs().max()), (i, gap)


def _mt_bench_prompts(tok, n: int):
    if not MT_BENCH.exists():
        pytest.skip(f"{MT_BENCH} not found: set HYDRA_FAST_TEST_PROMPTS to an MT-Bench question.jsonl")
    rows = [json.loads(x) for x in MT_BENCH.read_text().splitlines() if x.strip()][:n]
    return [tok.apply_chat_template([{"role": "user", "content": r["turns"][0]}], add_generation_prompt=True,
                                    return_tensors="pt", return_dict=True)["input_ids"].cuda() for r in rows]


@pytest.mark.slow
def test_smollm2_fp32_shipped_heads_equal_hf_on_mt_bench():
    # all 80 MT-Bench first turns, 128 new tokens, fp32, the shipped (trained) heads of each kind: every output
    # equals HF greedy, and each kind's heads are accepted (tau well above 1)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hydra_fast import hub
    from hydra_fast.defaults import default_heads_path

    path = os.environ.get("HYDRA_FAST_TEST_MODEL") or hub.default_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    prompts = _mt_bench_prompts(tok, 80)
    refs = [base.generate(ids, max_new_tokens=128, do_sample=False) for ids in prompts]
    taus, mismatched = {}, {}
    for kind in KINDS:
        model = HydraModel.from_pretrained(base, default_heads_path(kind), tree="mc_sim_7b_63", max_cache_len=1024)
        steps = tokens = 0
        for q, (ids, ref) in enumerate(zip(prompts, refs)):
            out = model.generate(ids, max_new_tokens=128, return_dict_in_generate=True)
            if not torch.equal(out.sequences, ref):
                mismatched.setdefault(kind, []).append(q)
            steps += len(out.accept_lengths[0])
            tokens += sum(out.accept_lengths[0])
        taus[kind] = tokens / steps
        del model
    assert not mismatched, f"prompts whose output differs from HF greedy, by kind: {mismatched}"
    assert min(taus.values()) > 1.5, f"tau by kind {taus}: trained heads should be accepted well above 1"

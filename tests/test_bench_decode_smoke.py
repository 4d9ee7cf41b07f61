"""bench/bench_decode.py and bench/bench_step.py run end to end on the CPU and write the JSON a reader needs.

A tiny random Llama (no download), 2 prompts x 8 new tokens, and bench_step's tiny config: well under a minute.
One CPU thread each: on a shared 2-core machine more threads only add contention. The benchmarks run on the GPU.
Deadlines are generous (the runs take seconds): the tests check behaviour, not how fast a loaded machine is.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import needs_extension

REPO = Path(__file__).resolve().parents[1]


def _run(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "python"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_bench_decode_tiny_random_cpu(tmp_path):
    out = tmp_path / "decode.json"
    answers = tmp_path / "answers"
    proc = _run([str(REPO / "bench" / "bench_decode.py"), "--tiny-random", "--device", "cpu", "--threads", "1",
                 "--num-prompts", "2", "--hf-prompts", "2", "--split-prompts", "1", "--max-new-tokens", "8",
                 "--methods", "hf,hf_static,hf_static_compile,plain,medusa,hydra,hydra++", "--tree", "tiny",
                 "--json", str(out), "--answers-dir", str(answers), "--deadline-s", "1500"], timeout=1800)
    assert "| method |" in proc.stdout and out.with_suffix(".md").exists()

    report = json.loads(out.read_text())
    for key in ("meta", "methods", "per_prompt", "targets", "notes", "stopped_early"):
        assert key in report, key
    assert report["stopped_early"] is None
    for key in ("date", "torch", "device", "model", "dtype", "tree", "max_new_tokens", "max_cache_len", "elapsed_s"):
        assert key in report["meta"], key
    methods = report["methods"]
    assert "hf_static_compile" not in methods and "hf_static_compile" in report["notes"]  # off on CPU by default
    for name in ("hf", "hf_static", "plain", "medusa", "hydra", "hydra++"):
        m = methods[name]
        assert "error" not in m, (name, m["error"])
        assert m["prompts"] == 2 and m["tok_s"] > 0 and m["new_tokens"] == 16, (name, m)
        assert len(report["per_prompt"][name]) == 2
    for name in ("plain", "medusa", "hydra", "hydra++"):
        m = methods[name]
        hist = m["accept_hist"]
        assert sum(hist) == m["steps"] and sum((i + 1) * c for i, c in enumerate(hist)) >= 14  # >= 8 - 1 per prompt
        assert 1.0 <= m["tau"] <= len(hist)
        split = m["split"]
        for key in ("draft_ms", "verify_ms", "accept_ms", "host_ms", "step_device_ms", "step_wall_ms"):
            assert split[key] >= 0, (name, key, split)
        assert set(m["speedup"]) >= {"hf", "hf_static"}
        # greedy speculative decoding reproduces HF greedy token for token (fp32, CPU)
        assert m["agreement"]["vs_hf"]["identical"] == 2, (name, m["agreement"])
    assert methods["hydra++"]["heads"] == "untrained"
    assert methods["plain"]["accept_hist"][1:] == [0] * (len(methods["plain"]["accept_hist"]) - 1)
    assert [t["target"] for t in report["targets"]] == ["hydra++ >= 1.3x hf (tok/s)"]
    for name in ("plain", "hydra++"):  # one eager step profiled: on the CPU, top-level aten ops
        k = methods[name]["kernels_per_step"]
        assert k["what"] == "aten ops (top-level)" and k["count"] > 0, k
    assert methods["hydra++"]["kernels_per_step"]["count"] > methods["plain"]["kernels_per_step"]["count"]
    assert methods["hydra++"]["vs_plain_same_mode"]["baseline"] == "plain"

    lines = (answers / "tiny-random-llama-hydrapp.jsonl").read_text().splitlines()
    row = json.loads(lines[0])
    choice = row["choices"][0]
    assert len(lines) == 2 and {"question_id", "model_id", "choices"} <= set(row)
    assert len(choice["turns"]) == 1 and choice["new_tokens"] == [8] and sum(choice["accept_lengths"][0]) >= 7


def test_bench_step_tiny_cpu(tmp_path):
    out = tmp_path / "step.json"
    proc = _run([str(REPO / "bench" / "bench_step.py"), "--device", "cpu", "--tiny", "--threads", "1",
                 "--sizes", "1,4,16", "--budget-s", "0.05", "--min-reps", "3", "--json", str(out),
                 "--tau", "2.0", "--tau-source", "a test value", "--deadline-s", "1000"], timeout=1200)
    assert "Hydra++ tree" in proc.stdout and out.with_suffix(".md").exists()

    report = json.loads(out.read_text())
    assert report["stopped_early"] is None
    meta = report["meta"]
    assert meta["copy"]["GBps"] > 0 and meta["matmul"]["TFLOPs"] > 0
    assert meta["tau"] == {"tau": 2.0, "source": "a test value"}
    tiny = report["models"]["tiny"]
    assert tiny["streamed_bytes"] < tiny["param_bytes"] and tiny["heads_bytes"] > 0  # input embedding not streamed
    plain = tiny["plain"]
    for key in ("device_ms", "wall_ms", "floor_ms", "x_floor", "pct_bw", "tok_s"):
        assert plain[key] > 0, key
    trees = {t["tree"]: t for t in tiny["trees"]}
    assert list(trees) == ["greedy(1)", "greedy(4)", "greedy(16)", "mc_sim_7b_63"]
    for name, t in trees.items():
        assert "error" not in t, (name, t["error"])
        for key in ("device_ms", "wall_ms", "draft_ms", "verify_ms", "accept_ms", "host_ms", "x_plain", "floor_ms",
                    "proj_tok_s"):
            assert t[key] >= 0, (name, key)
    assert [trees[n]["nodes"] for n in trees] == [1, 4, 16, 64]
    assert tiny["target"]["x_plain"] == trees["mc_sim_7b_63"]["x_plain"]
    mc = trees["mc_sim_7b_63"]
    assert abs(mc["proj_tok_s"] - 2.0 / (mc["wall_ms"] / 1e3)) < 1e-6 * mc["proj_tok_s"]
    assert plain["kernels_per_step"]["count"] > 0
    assert mc["kernels_per_step"]["count"] > plain["kernels_per_step"]["count"]


def test_bench_decode_categories_and_compiled_baselines(tmp_path):
    # a prompt file of both formats with categories; --method repeated; --compile adds plain_compile, the
    # baseline of every compiled method (no compilation here: only the method list is built, --deadline-s 0)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in (
        {"category": "math", "prompt": "What is 2 + 2?"}, {"category": "code", "turns": ["Write a loop.", "More."]},
        {"category": "math", "prompt": "Add 3 and 4."})) + "\n")
    out = tmp_path / "decode.json"
    _run([str(REPO / "bench" / "bench_decode.py"), "--tiny-random", "--device", "cpu", "--threads", "1",
          "--prompts", str(prompts), "--num-prompts", "3", "--split-prompts", "0", "--max-new-tokens", "6",
          "--method", "plain", "--method", "hydra", "--tree", "tiny", "--json", str(out), "--deadline-s", "1000"],
         timeout=1200)
    report = json.loads(out.read_text())
    assert report["meta"]["categories"] == ["code", "math"]
    for name in ("plain", "hydra"):
        m = report["methods"][name]
        assert m["prompts"] == 3 and set(m["categories"]) == {"code", "math"}
        assert m["categories"]["math"]["prompts"] == 2 and m["categories"]["code"]["prompts"] == 1
        mean = m["mean_over_categories"]
        assert mean["categories"] == 2
        assert abs(mean["tau"] - (m["categories"]["math"]["tau"] + m["categories"]["code"]["tau"]) / 2) < 1e-9
    assert "Per category" in out.with_suffix(".md").read_text()

    listed = tmp_path / "compiled.json"
    _run([str(REPO / "bench" / "bench_decode.py"), "--tiny-random", "--device", "cpu", "--num-prompts", "1",
          "--method", "hydra++", "--compile", "--compile-methods", "medusa,hydra++", "--json", str(listed),
          "--deadline-s", "0"], timeout=600)
    names = list(json.loads(listed.read_text())["methods"])
    assert names == ["hydra++", "medusa_compile", "hydra++_compile", "plain_compile"]


def test_greedy_tree_is_valid():
    sys.path.insert(0, str(REPO / "bench"))
    sys.path.insert(0, str(REPO / "python"))
    from bench_decode import greedy_tree
    from hydra_fast.tree import Tree

    for n in (1, 2, 4, 8, 16, 32, 64, 128):
        tree = Tree.from_choices(greedy_tree(n))  # raises if a node's parent is missing
        assert tree.num_nodes == n and tree.max_depth <= 4


@needs_extension  # the rows named are the extension's ops
def test_profile_decode_tiny_random_cpu(tmp_path):
    # the per-op profile of real generate() calls: steps and tokens counted, rows per step, our ops among them
    out = tmp_path / "profile.json"
    proc = _run([str(REPO / "bench" / "profile_decode.py"), "--tiny-random", "--device", "cpu", "--threads", "1",
                 "--kind", "hydra", "--tree", "tiny", "--context-draft", "2", "--num-prompts", "3",
                 "--max-new-tokens", "8", "--top", "5", "--json", str(out)], timeout=900)
    assert "| us / step | calls / step | share | name |" in proc.stdout and out.with_suffix(".md").exists()
    report = json.loads(out.read_text())
    assert report["meta"]["kind"] == "hydra" and report["meta"]["context_draft"] == 2
    assert report["new_tokens"] == 3 * 8 and 0 < report["steps"] <= report["new_tokens"]
    assert report["tau"] == report["new_tokens"] / report["steps"]
    rows = report["rows"]
    assert rows and all(r["us_per_step"] >= 0 and r["calls_per_step"] > 0 for r in rows)
    assert [r["us_per_step"] for r in rows] == sorted((r["us_per_step"] for r in rows), reverse=True)
    names = {r["name"] for r in rows}
    assert {"hydra_fast::tree_attention", "hydra_fast::draft_head_mlp"} <= names, sorted(names)[:20]
    total = report["time_us_per_step"]
    assert abs(sum(r["us_per_step"] for r in rows) - total) <= 1e-6 * total + 1e-6

"""bench/bench_ops.py runs end to end in its quick CPU mode and writes the JSON its readers use.

One op, no torch.compile, tiny sizes: a few seconds. The benchmark itself runs on the GPU machine.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_ops_quick_cpu(tmp_path):
    out = tmp_path / "bench.json"
    md = tmp_path / "bench.md"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "python"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_ops.py"), "--device", "cpu", "--quick", "--compile", "off",
         "--ops", "accept_greedy", "--budget-s", "0.005", "--json", str(out), "--md", str(md)],
        capture_output=True, text=True, timeout=900, cwd=REPO, env=env,  # a hang guard
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "### accept_greedy" in proc.stdout and md.read_text().count("| 1000 |") == 1

    report = json.loads(out.read_text())
    meta = report["meta"]
    for key in ("date", "torch", "device", "device_name", "hydra_fast_build_info", "copy", "matmul", "elapsed_s"):
        assert key in meta, key
    assert meta["copy"]["GBps"] > 0

    rows = report["results"]["accept_greedy"]
    assert len(rows) == 1
    row = rows[0]
    for key in ("label", "bytes", "floor_us", "n_sets", "methods", "checks"):
        assert key in row, key
    assert row["bytes"] > 0 and row["label"] == {"V": 1000}
    assert row["methods"]["compile"] == {"skipped": "--compile off"}
    for name in ("ours", "eager"):
        res = row["methods"][name]
        # a method either has a time or the error that stopped it, never neither
        assert ("median_us" in res) != ("error" in res), res
        if "median_us" in res:
            assert res["median_us"] > 0 and res["reps"] >= 3 and "GBps" in res
            assert row["checks"][name]["ok"], row["checks"][name]

"""The held-out evaluation prompts (bench/prompts/heldout.jsonl): shape, and disjointness from training prompts.

The training prompt set is recomputed as scripts/make_train_prompts.py builds it: its file-free sources (the
built-in templates, the standard library, the generated word problems) always; the whole mix when the source
files are present ($HYDRA_FAST_PROMPT_SOURCES or out/prompt_sources, from scripts/fetch_prompt_sources.sh).
"""
import dataclasses
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import make_eval_prompts as mep  # noqa: E402
from hydra_fast.train import sources as src  # noqa: E402

SOURCES = Path(os.environ.get("HYDRA_FAST_PROMPT_SOURCES", ROOT / "out" / "prompt_sources"))
needs_sources = pytest.mark.skipif(not (SOURCES / "wiki_summaries_fr.json").is_file(),
                                   reason=f"prompt source files not in {SOURCES} (scripts/fetch_prompt_sources.sh)")


@pytest.fixture(scope="module")
def rows():
    lines = mep.DEFAULT_OUT.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def test_heldout_has_six_categories_of_twenty_prompts(rows):
    assert all(set(r) == {"category", "prompt"} and r["prompt"].strip() for r in rows)
    counts = {}
    for r in rows:
        counts[r["category"]] = counts.get(r["category"], 0) + 1
    assert set(counts) == set(mep.CATEGORIES) and len(counts) >= 6
    assert min(counts.values()) >= 20
    assert len({" ".join(r["prompt"].split()).casefold() for r in rows}) == len(rows)  # no repeats
    assert max(len(r["prompt"]) for r in rows) < 3000  # well under 1500 tokens
    first = [r["category"] for r in rows[: len(counts)]]
    assert sorted(first) == sorted(counts)  # categories take turns: any prefix is balanced


def test_heldout_keeps_mt_bench_out(rows):
    mt = src.find_mt_bench()
    if mt is None:
        pytest.skip(f"no MT-Bench question file (${src.MT_BENCH_ENV} or shared/data/mt_bench.jsonl)")
    assert src.check_no_mt_bench([r["prompt"] for r in rows], mt) == 80


def _file_free_training(scale: float) -> list[str]:
    specs = [src.SourceSpec.parse(m) for m in mep.MIX if "{S}" not in m]
    assert {s.name for s in specs} == {"builtin", "stdlib", "math"}
    return src.collect_prompts([dataclasses.replace(s, count=round(s.count * scale)) for s in specs], 0)[0]


def test_heldout_is_disjoint_from_the_file_free_training_sources(rows):
    train = _file_free_training(1.0)
    guard = mep.Guard.of(train)
    assert mep.check(rows, guard)  # no training prompt, no 13-word run shared with one
    code = [r["prompt"] for r in rows if r["category"] == "code"]
    assert not any(p in guard.prompts for p in code)


def test_guard_catches_shared_text():
    guard = mep.Guard.of(["Tell me about Ada Lovelace.",
                          "Summarize this: the quick brown fox jumps over the lazy dog while the cat sleeps "
                          "on the warm mat by the door"])
    assert guard.text_shared("Translate: The quick brown fox jumps over the lazy dog while the cat sleeps on the "
                             "warm mat.")
    assert not guard.text_shared("The quick brown fox jumps over the lazy dog.")  # shorter than 13 words
    with pytest.raises(ValueError, match="shares text with the training prompts"):
        mep.check([{"category": "qa", "prompt": "Tell me about Ada Lovelace."}], guard)


def test_heldout_code_comes_from_the_reserve_training_never_reads(rows):
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    reserved, other = set(), set()
    for f in sorted(root.glob("*.py")):
        for _, _, code in src._code_snippets(f):
            (reserved if src.reserved("code", code) else other).add(code)
    assert reserved and other
    train = "\n".join(_file_free_training(1.0))
    assert not any(code in train for code in sorted(reserved)[:300])  # the stdlib source never reads the reserve
    shown = [c for c in reserved | other if any(c in r["prompt"] for r in rows if r["category"] == "code")]
    assert shown and all(c in reserved for c in shown)


@pytest.mark.slow
@needs_sources
def test_heldout_is_disjoint_from_the_whole_training_mix_and_rebuilds(rows):
    guard = mep.Guard.of(mep.training_prompts(str(SOURCES)))
    assert mep.check(rows, guard)
    assert mep.build(SOURCES, guard) == rows  # the committed file is what the script builds, wherever SOURCES lies

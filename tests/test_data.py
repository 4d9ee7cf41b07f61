"""Self-distilled training data: prompt sources, the MT-Bench guard, deterministic and resumable builds, and
clear errors for mismatched models, tokenizers, recipes, corrupt shards and empty sets."""
import gzip
import json
import random

import pytest
import torch
from _train_tiny import char_tokenizer, tiny_llama

from hydra_fast.train import selfdistill as build_mod
from hydra_fast.train import sources as src
from hydra_fast.train import task_sources as ts
from hydra_fast.train.selfdistill import BuildConfig, build
from hydra_fast.train.dataset import (MANIFEST, DataError, DataMismatchError, SelfDistillData, collate,
                                      read_manifest)

QUESTION = "Compose an engaging travel blog post about a recent trip to Hawaii, highlighting cultural experiences."


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture
def mt_bench(tmp_path):
    path = tmp_path / "mt_bench.jsonl"
    path.write_text(json.dumps({"question_id": 81, "turns": [QUESTION, "Rewrite it."]}) + "\n")
    return path


def cfg(**kw):
    return BuildConfig(**{"sources": ("builtin:12",), "max_new_tokens": 8, "batch_size": 2, "shard_size": 4, **kw})


def shard_hashes(directory):
    return {k: v["sha256"] for k, v in read_manifest(directory)["shards"].items()}


# ------------------------------------------------------------------------------------------- sources
def test_source_spec_parse():
    assert src.SourceSpec.parse("stdlib:30") == src.SourceSpec("stdlib", 30, None)
    assert src.SourceSpec.parse("wiki:5@/x/y.json") == src.SourceSpec("wiki", 5, "/x/y.json")
    assert str(src.SourceSpec.parse("builtin")) == "builtin:1000"
    with pytest.raises(ValueError, match="unknown prompt source 'nope'"):
        src.SourceSpec.parse("nope:3")
    with pytest.raises(ValueError, match="needs a local file"):
        src.SourceSpec.parse("wiki:3")
    with pytest.raises(ValueError, match="not an integer"):
        src.SourceSpec.parse("builtin:x")


def test_collect_prompts_is_seeded_and_deduplicated():
    specs = [src.SourceSpec("builtin", 50), src.SourceSpec("builtin", 50)]
    a, counts = src.collect_prompts(specs, seed=3)
    assert a == src.collect_prompts(specs, seed=3)[0]
    assert len(a) == len(set(a)) and set(counts.values()) == {50, 0}  # the repeated spec adds nothing new
    assert a != src.collect_prompts(specs, seed=4)[0]
    with pytest.raises(ValueError, match="no prompt sources"):
        src.collect_prompts([], 0)


def test_stdlib_source_gives_code_instructions():
    prompts = src.load_stdlib(None, 6, random.Random(0))
    assert len(prompts) == 6 and all("```python\n" in p for p in prompts)
    assert prompts == src.load_stdlib(None, 6, random.Random(0))


def test_file_sources(tmp_path):
    wiki = tmp_path / "summaries.json"
    wiki.write_text(json.dumps({f"T{i}": {"title": f"Topic {i}", "extract": f"Topic {i} is a thing. " * 10}
                                for i in range(40)}))
    novel = tmp_path / "novel.txt"
    novel.write_text("\n\n".join(f"Paragraph {i}. " + "She walked on. " * 20 for i in range(6)))
    fortunes = tmp_path / "fortunes"
    fortunes.mkdir()
    (fortunes / "misc").write_text("A fortune worth reading twice.\n%\nAnother saying, wise and short.\n%\nx\n")
    he = tmp_path / "HumanEval.jsonl.gz"
    with gzip.open(he, "wt") as f:
        f.write(json.dumps({"prompt": "def add(a, b):\n    \"\"\"Add.\"\"\"\n"}) + "\n")
    own = tmp_path / "mine.jsonl"
    own.write_text('{"prompt": "p1"}\n{"instruction": "do", "input": "this"}\n{"turns": ["t1", "t2"]}\n')
    rng = random.Random(0)
    w = src.load_wiki(str(wiki), 3, rng)
    assert len(w) == 3 and all("Topic" in p for p in w)
    t = src.load_text(str(novel), 10, rng)
    assert t and all(300 <= len(p) for p in t)
    assert len(src.load_fortunes(str(fortunes), 10, rng)) == 2  # "x" is too short to be a prompt
    assert "def add" in src.load_humaneval(str(he), 5, rng)[0]
    assert sorted(src.load_jsonl(str(own), 5, rng)) == ["do\n\nthis", "p1", "t1"]
    with pytest.raises(FileNotFoundError):
        src.load_wiki(str(tmp_path / "missing.json"), 3, rng)


def _summaries(path, lang, n):
    path.write_text(json.dumps({f"T{i}": {"title": f"{lang} topic {i}",
                                          "extract": f"Sentence {i} of the {lang} summary. " * 12}
                                for i in range(n)}))
    return path


def test_the_evaluation_reserve_never_becomes_a_training_prompt(tmp_path):
    wiki = _summaries(tmp_path / "wiki_summaries_en.json", "en", 200)
    kept = {i for i in range(200) if src.reserved("wiki-en", f"en topic {i}")}
    assert 0 < len(kept) < 60  # about one in RESERVE_EVERY
    prompts = src.load_wiki(str(wiki), 500, random.Random(0)) + ts.load_grounded(str(wiki), 500, random.Random(0))
    assert len(prompts) == 2 * (200 - len(kept))
    assert not any(f"Sentence {i} of" in p for p in prompts for i in kept)
    assert all(any(f"Sentence {i} of" in p for p in prompts) for i in set(range(200)) - kept)
    evaluation = src.wiki_articles(str(wiki), keep_reserved=True)  # what the held-out builder reads
    assert {t for t, _ in evaluation} == {f"en topic {i}" for i in kept}
    assert src.reserved("wiki-en", "a  b") == src.reserved("wiki-en", "a b")  # whitespace does not move an item


def test_prompts_do_not_depend_on_where_the_files_lie(tmp_path):
    a, b = tmp_path / "a", tmp_path / "elsewhere" / "b"
    for d in (a, b):
        d.mkdir(parents=True)
        _summaries(d / "wiki_summaries_en.json", "en", 50)
    pa = src.collect_prompts([src.SourceSpec.parse(f"wiki:20@{a}/wiki_summaries_en.json")], 0)[0]
    pb = src.collect_prompts([src.SourceSpec.parse(f"wiki:20@{b}/wiki_summaries_en.json")], 0)[0]
    assert pa == pb and len(pa) == 20
    assert pa != src.collect_prompts([src.SourceSpec.parse(f"wiki:20@{a}/wiki_summaries_en.json")], 1)[0]


def test_task_sources(tmp_path):
    for code in ("en", "fr", "es"):
        _summaries(tmp_path / f"wiki_summaries_{code}.json", code, 60)
    rng = random.Random(0)
    tr = src.collect_prompts([src.SourceSpec.parse(f"translate:30@{tmp_path}")], 0)[0]
    assert len(tr) == 30
    into_en = [p for p in tr if "English" in p]
    assert 15 <= len(into_en) <= 25 and all(" fr summary" in p or " es summary" in p for p in into_en)
    assert all(" en summary" in p for p in tr if p not in into_en)
    assert any("French" in p for p in tr) and any("Spanish" in p for p in tr)
    g = ts.load_grounded(str(tmp_path / "wiki_summaries_en.json"), 5, rng)
    assert len(g) == 5 and all("en summary" in p for p in g)
    m = ts.load_math(None, 40, random.Random(0))
    assert len(m) == len(set(m)) == 40 and all(any(ch.isdigit() for ch in p) for p in m)
    assert m == ts.load_math(None, 40, random.Random(0))
    (tmp_path / "solo").mkdir()
    _summaries(tmp_path / "solo" / "wiki_summaries_en.json", "en", 5)
    with pytest.raises(FileNotFoundError, match="at least one other language"):
        ts.load_translate(str(tmp_path / "solo"), 5, rng)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        ts.load_translate(str(tmp_path / "wiki_summaries_en.json"), 5, rng)
    with pytest.raises(ValueError, match="needs a local file"):
        src.SourceSpec.parse("translate:5")


def test_austen_needs_its_r_data(tmp_path):
    with pytest.raises((FileNotFoundError, ImportError)):
        src.load_austen(str(tmp_path), 3, random.Random(0))


def test_mt_bench_guard(mt_bench, tmp_path):
    assert src.check_no_mt_bench(["hello", "Tell me about cats."], mt_bench) == 1
    with pytest.raises(src.EvalLeakError, match="MT-Bench question 81"):
        src.check_no_mt_bench(["ok", "  " + QUESTION.upper() + " "], mt_bench)
    with pytest.raises(src.EvalLeakError):  # wrapped in an instruction template
        src.check_no_mt_bench([f"Answer briefly: {QUESTION}"], mt_bench)
    assert src.check_no_mt_bench(["Rewrite it. Please."], mt_bench) == 1  # short second turns are not matched
    assert src.find_mt_bench(mt_bench) == mt_bench
    with pytest.raises(FileNotFoundError):
        src.find_mt_bench(tmp_path / "none.jsonl")


def test_build_rejects_mt_bench_prompts(tmp_path, model, tok, mt_bench):
    own = tmp_path / "prompts.jsonl"
    own.write_text(json.dumps({"prompt": "fine"}) + "\n" + json.dumps({"prompt": QUESTION}) + "\n")
    with pytest.raises(src.EvalLeakError):
        build(model, tok, tmp_path / "d", cfg(sources=(f"jsonl:5@{own}",)), mt_bench=mt_bench, progress=False)
    assert not (tmp_path / "d" / MANIFEST).exists()


# --------------------------------------------------------------------------------------------- build
def test_build_is_deterministic_and_loads(tmp_path, model, tok, mt_bench):
    m1 = build(model, tok, tmp_path / "a", cfg(), mt_bench=mt_bench, progress=False)
    build(model, tok, tmp_path / "b", cfg(), mt_bench=mt_bench, progress=False)
    assert m1["complete"] and len(m1["shards"]) == 3 and m1["num_prompts"] == 12
    assert m1["mt_bench_guard"]["questions_checked"] == 1
    assert shard_hashes(tmp_path / "a") == shard_hashes(tmp_path / "b")
    data = SelfDistillData(tmp_path / "a", model)
    assert len(data) == 12
    prompts = [json.loads(line)["prompt"] for line in open(tmp_path / "a" / "prompts.jsonl")]
    ids, start = data[0]
    chat = tok.apply_chat_template([{"role": "user", "content": prompts[0]}], add_generation_prompt=True,
                                   tokenize=False)
    assert ids[:start].tolist() == tok(chat, add_special_tokens=False)["input_ids"]
    # the answer is the base model's own greedy continuation, cut after the end token
    ref = model.generate(ids[:start].view(1, -1), max_new_tokens=8, do_sample=False, eos_token_id=[2],
                         pad_token_id=0)[0, start:].tolist()
    assert ids[start:].tolist() == (ref[: ref.index(2) + 1] if 2 in ref else ref)


def test_sampled_build_is_seeded(tmp_path, model, tok, mt_bench):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        build(model, tok, tmp_path / name, cfg(do_sample=True, temperature=1.0, seed=seed), mt_bench=mt_bench,
              progress=False)
    assert shard_hashes(tmp_path / "a") == shard_hashes(tmp_path / "b")
    assert shard_hashes(tmp_path / "a") != shard_hashes(tmp_path / "c")


def test_build_resumes_after_interruption(tmp_path, model, tok, mt_bench, monkeypatch):
    full = tmp_path / "full"
    build(model, tok, full, cfg(do_sample=True, temperature=1.0), mt_bench=mt_bench, progress=False)
    calls = {"n": 0}
    real = build_mod.answer

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:  # 2 batches a shard: dies inside shard 1's second batch
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(build_mod, "answer", flaky)
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        build(model, tok, part, cfg(do_sample=True, temperature=1.0), mt_bench=mt_bench, progress=False)
    m = read_manifest(part)
    assert list(m["shards"]) == ["00000"] and not m["complete"]
    calls["n"] = -100
    m = build(model, tok, part, cfg(do_sample=True, temperature=1.0), mt_bench=mt_bench, progress=False)
    assert m["complete"] and calls["n"] == -100 + 4  # shard 0 skipped: 2 shards x 2 batches
    assert shard_hashes(part) == shard_hashes(full)


def test_time_budget_stops_between_shards(tmp_path, model, tok, mt_bench):
    m = build(model, tok, tmp_path / "d", cfg(), mt_bench=mt_bench, time_budget_s=1e-9, progress=False)
    assert len(m["shards"]) == 1 and not m["complete"]  # the first shard always runs


# -------------------------------------------------------------------------------------------- errors
def test_mismatch_errors(tmp_path, model, tok, mt_bench):
    d = tmp_path / "d"
    build(model, tok, d, cfg(), mt_bench=mt_bench, progress=False)
    other = tiny_llama(seed=1)
    with pytest.raises(DataMismatchError, match="generated by LlamaForCausalLM.*lm_head_sketch differ"):
        build(other, tok, d, cfg(), mt_bench=mt_bench, progress=False)
    with pytest.raises(DataMismatchError, match="lm_head_sketch differ"):
        SelfDistillData(d, other)
    with pytest.raises(DataMismatchError, match="recipe differ"):
        build(model, tok, d, cfg(max_new_tokens=5), mt_bench=mt_bench, progress=False)
    small = tiny_llama(vocab=64)
    with pytest.raises(DataMismatchError, match="tokenizer has 104 tokens but the model's vocabulary has 64"):
        build(small, tok, tmp_path / "e", cfg(), mt_bench=mt_bench, progress=False)
    # --overwrite starts afresh
    m = build(model, tok, d, cfg(max_new_tokens=5), mt_bench=mt_bench, overwrite=True, progress=False)
    assert m["recipe"]["max_new_tokens"] == 5


def test_corrupt_and_empty_data(tmp_path, model, tok, mt_bench):
    with pytest.raises(DataError, match="missing"):
        SelfDistillData(tmp_path / "nothing")
    d = tmp_path / "d"
    build(model, tok, d, cfg(), mt_bench=mt_bench, progress=False)
    shard = d / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:50])
    with pytest.raises(DataError, match="shard-00001.safetensors: sha256 differs"):
        SelfDistillData(d, model)
    # a rebuild regenerates the damaged shard and nothing else
    build(model, tok, d, cfg(), mt_bench=mt_bench, progress=False)
    assert len(SelfDistillData(d, model)) == 12
    (d / MANIFEST).write_text("{not json")
    with pytest.raises(DataError, match="unreadable manifest"):
        SelfDistillData(d)
    with pytest.raises(DataError, match="empty"):
        build(model, tok, tmp_path / "e", cfg(max_prompt_tokens=3), mt_bench=mt_bench, progress=False)


def test_collate_masks_only_answers():
    samples = [(torch.tensor([5, 6, 7, 8, 9]), 3), (torch.tensor([1, 2, 3]), 1)]
    b = collate(samples, max_len=4)
    assert b.input_ids.tolist() == [[5, 6, 7, 8], [1, 2, 3, 0]]
    assert b.attention_mask.tolist() == [[True] * 4, [True, True, True, False]]
    assert b.answer_mask.tolist() == [[False, False, False, True], [False, True, True, False]]


def test_workers_build_the_files_of_one_process(tmp_path, model, tok, mt_bench):
    one = build(model, tok, tmp_path / "one", cfg(), mt_bench=mt_bench, progress=False)
    # worker 1 of 2 first (it writes the manifest), then worker 0: shards 1 / 0 and 2
    m1 = build(model, tok, tmp_path / "two", cfg(), mt_bench=mt_bench, progress=False, workers=2, worker=1)
    assert list(m1["shards"]) == ["00001"] and not m1["complete"]
    m = build(model, tok, tmp_path / "two", cfg(), mt_bench=mt_bench, progress=False, workers=2, worker=0)
    assert m["complete"] and sorted(m["shards"]) == ["00000", "00001", "00002"]
    assert shard_hashes(tmp_path / "two") == shard_hashes(tmp_path / "one")
    assert m["skipped_long_prompts"] == one["skipped_long_prompts"]
    assert len(SelfDistillData(tmp_path / "two", model)) == 12
    with pytest.raises(ValueError, match="0 <= worker < workers"):
        build(model, tok, tmp_path / "x", cfg(), mt_bench=mt_bench, progress=False, workers=2, worker=2)
    with pytest.raises(DataError, match="delete .* first"):
        build(model, tok, tmp_path / "two", cfg(), mt_bench=mt_bench, progress=False, workers=2, overwrite=True)


def test_cached_hidden_and_top_k_are_the_base_outputs(tmp_path, model, tok, mt_bench):
    plain = build(model, tok, tmp_path / "plain", cfg(), mt_bench=mt_bench, progress=False)
    m = build(model, tok, tmp_path / "c", cfg(cache_hidden=True, cache_top_k=7), mt_bench=mt_bench, progress=False)
    assert m["recipe"]["cache_top_k"] == 7 and plain["complete"]
    data, ref = SelfDistillData(tmp_path / "c", model), SelfDistillData(tmp_path / "plain", model)
    assert data.has_hidden and data.top_k == 7 and not ref.has_hidden and ref.top_k == 0
    assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(data.samples, ref.samples))
    for i in (0, 5, 11):
        ids, start = data[i]
        c = data.cached[i]
        with torch.no_grad():
            h = model.get_decoder()(input_ids=ids.view(1, -1)).last_hidden_state[0]  # [L, d]
            logp = torch.log_softmax(model.lm_head(h).float(), -1)  # [L, V]
        torch.testing.assert_close(c.hidden.float(), h, atol=2e-2, rtol=1e-2)  # bf16 storage
        assert c.top_ids.shape == (len(ids) - start, 7)
        v, j = logp[start - 1: len(ids) - 1].topk(7, dim=-1)  # answer token t <- position t - 1
        assert torch.equal(c.top_ids.long(), j)
        torch.testing.assert_close(c.top_logp.float(), v, atol=2e-2, rtol=1e-3)  # fp16 storage
    # a batch puts each answer token's teacher at the position before it, padding elsewhere
    b = collate([data[0], data[1]], max_len=64, cached=[data.cached[0], data.cached[1]])
    ids, start = data[1]
    assert b.hidden.shape[:2] == b.input_ids.shape
    assert torch.equal(b.top_ids[1, start - 1], data.cached[1].top_ids[0].long())
    assert torch.isinf(b.top_logp[1, : start - 1]).all() and b.hidden[1, len(ids):].abs().sum() == 0
    # another cache setting is another recipe: resuming into it is refused
    with pytest.raises(DataMismatchError, match="recipe differ"):
        build(model, tok, tmp_path / "c", cfg(cache_hidden=True), mt_bench=mt_bench, progress=False)


def test_manifests_from_before_the_cache_options_still_resume(tmp_path, model, tok, mt_bench):
    d = tmp_path / "d"
    build(model, tok, d, cfg(), mt_bench=mt_bench, progress=False, time_budget_s=1e-9)  # one shard of three
    m = read_manifest(d)
    for key in ("cache_hidden", "cache_top_k"):
        del m["recipe"][key]
    (d / MANIFEST).write_text(json.dumps(m))
    m = build(model, tok, d, cfg(), mt_bench=mt_bench, progress=False)
    assert m["complete"] and len(m["shards"]) == 3


def test_corrupt_cache_is_a_clear_error(tmp_path, model, tok, mt_bench):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "d"
    build(model, tok, d, cfg(cache_hidden=True, cache_top_k=3), mt_bench=mt_bench, progress=False)
    shard = d / "shard-00000.safetensors"
    t = load_file(shard)
    t["top_ids"] = t["top_ids"][:-1].contiguous()
    t["top_logp"] = t["top_logp"][:-1].contiguous()
    save_file(t, shard)
    m = read_manifest(d)
    from hydra_fast.hub import sha256_file

    m["shards"]["00000"]["sha256"] = sha256_file(shard)
    (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(DataError, match="do not match its samples"):
        SelfDistillData(d, model)
    with pytest.raises(ValueError, match="cache_top_k must be >= 0"):
        BuildConfig(cache_top_k=-1)

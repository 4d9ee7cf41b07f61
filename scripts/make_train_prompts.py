"""The prompt file the default SmolLM2 heads were trained on: a seeded mix of the offline sources.

    bash scripts/fetch_prompt_sources.sh out/prompt_sources
    python scripts/make_train_prompts.py --sources out/prompt_sources --out .data/train_prompts.jsonl.gz
    python scripts/make_train_prompts.py --scale 2 --out .data/train_prompts_x2.jsonl.gz    # ~18k prompts
    hydra-fast-train default-heads ... --source jsonl:9164@.data/train_prompts.jsonl.gz

One jsonl line per prompt ({"prompt": ...}), deduplicated, shuffled, checked against MT-Bench; the counts per
source go to OUT with .sources.json. Building the mix here and answering it on the GPU machine means the GPU
machine needs neither the source files nor the rdata/Debian tooling that reads them.
"""
from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

from hydra_fast.train import sources as src  # noqa: E402

MIX = ("builtin:2000", "wiki:1600@{S}/wiki_summaries_en.json", "stdlib:1200", "text:600@{S}/austen",
       "fortunes:600@{S}/fortunes", "humaneval:164@{S}/HumanEval.jsonl.gz", "translate:1500@{S}",
       "grounded:900@{S}/wiki_summaries_en.json", "math:600")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sources", default="out/prompt_sources", help="folder written by fetch_prompt_sources.sh")
    ap.add_argument("--out", type=Path, default=Path(".data/train_prompts.jsonl.gz"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=float, default=1.0,
                    help="multiply every count of the mix (HumanEval stays whole): 2 gives ~18k prompts")
    ap.add_argument("--mt-bench", default=None, help="MT-Bench questions to keep out (default: shared/data)")
    args = ap.parse_args(argv)
    specs = [src.SourceSpec.parse(m.format(S=args.sources)) for m in MIX]
    specs = [s if s.name == "humaneval" else dataclasses.replace(s, count=round(s.count * args.scale))
             for s in specs]
    prompts, counts = src.collect_prompts(specs, args.seed)
    checked = src.check_no_mt_bench(prompts, src.find_mt_bench(args.mt_bench))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(args.out, "wt", encoding="utf-8") as f:
        for p in prompts:
            f.write(json.dumps({"prompt": p}) + "\n")
    info = dict(seed=args.seed, sources=[str(s) for s in specs], counts=counts, mt_bench_checked=checked)
    Path(str(args.out).removesuffix(".gz").removesuffix(".jsonl") + ".sources.json").write_text(
        json.dumps(info, indent=1))
    print(f"{len(prompts)} prompts -> {args.out} ({', '.join(f'{k}: {v}' for k, v in counts.items())}); "
          f"{checked} MT-Bench questions kept out")
    return 0


if __name__ == "__main__":
    sys.exit(main())

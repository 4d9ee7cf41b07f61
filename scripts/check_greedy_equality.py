"""Greedy speculative output vs HF greedy on all 80 MT-Bench first turns (tests/test_smollm2.py runs a few).

    python scripts/check_greedy_equality.py [--device cuda] [--dtype float32] [--kinds plain,medusa,hydra,hydra++]
        [--heads-dir DIR] [--num-prompts 80] [--max-new-tokens 128] [--out result.json]

Prints, per mode, how many prompts gave identical tokens and, for the others, where they first diverged.
In fp32 every prompt must be identical; in bf16 a divergence means two logits tied within bf16 rounding
(verify runs 64 tokens at once, HF one: different kernels, different rounding).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

from hydra_fast import hub  # noqa: E402
from hydra_fast.defaults import heads_dir_name  # noqa: E402
from hydra_fast.generate import first_divergence  # noqa: E402
from hydra_fast.heads import DraftHeads  # noqa: E402
from hydra_fast.model import HydraModel  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF folder (default: SmolLM2-135M-Instruct from the cache)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--kinds", default="plain,medusa,hydra,hydra++")
    p.add_argument("--heads-dir", default=None, help="folder with medusa/ hydra/ hydra_pp/ (default: untrained)")
    p.add_argument("--mt-bench", default=str(ROOT.parent / "shared" / "data" / "mt_bench.jsonl"))
    p.add_argument("--num-prompts", type=int, default=80)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = args.model or hub.default_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).to(args.device).eval()
    rows = [json.loads(x) for x in Path(args.mt_bench).read_text().splitlines() if x.strip()][: args.num_prompts]
    prompts = [tok.apply_chat_template([{"role": "user", "content": r["turns"][0]}], add_generation_prompt=True,
                                       return_tensors="pt", return_dict=True)["input_ids"].to(args.device)
               for r in rows]
    refs = [base.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False)[0, ids.shape[1]:].tolist()
            for ids in prompts]
    report = {"device": args.device, "dtype": args.dtype, "prompts": len(prompts), "modes": {}}
    for kind in args.kinds.split(","):
        heads = None
        if kind != "plain":
            d = Path(args.heads_dir) / heads_dir_name(kind) if args.heads_dir else None
            heads = DraftHeads.from_pretrained(d, base) if d and d.exists() else DraftHeads.from_base(base, kind)
        model = HydraModel(base, heads, max_cache_len=2048)
        divs = []
        for ids, ref in zip(prompts, refs):
            out = model.generate(ids, max_new_tokens=args.max_new_tokens)[0, ids.shape[1]:].tolist()
            divs.append(first_divergence(out, ref))
        same = sum(d is None for d in divs)
        diverged = [d for d in divs if d is not None]
        report["modes"][kind] = {"identical": same, "first_divergence": diverged,
                                 "mean_first_divergence": sum(diverged) / len(diverged) if diverged else None}
        print(f"{kind:8s} identical {same}/{len(prompts)}  first divergences {diverged}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

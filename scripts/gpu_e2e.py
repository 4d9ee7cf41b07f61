"""End-to-end checks on a CUDA machine: greedy agreement with HF and tokens/s of each mode, one JSON out.

    python scripts/gpu_e2e.py --model DIR [--prompts N] [--new-tokens 128] [--out e2e.json]

1. Tiny random Llama/Qwen2/Qwen3/Mistral in fp32 on CUDA: greedy output of plain decoding and of each head
   kind (kernels, CUDA graph) equals HF greedy token for token.
2. The real model in bf16: per MT-Bench first turn, HF generate (dynamic cache), our plain decoding and
   Medusa/Hydra/Hydra++ (untrained heads unless --heads-dir has trained ones): tokens/s, mean accepted
   length, step time, and agreement with HF greedy (identical share, first divergence position).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(ROOT / "tests"))

from hydra_fast.defaults import heads_dir_name  # noqa: E402
from hydra_fast.generate import first_divergence  # noqa: E402
from hydra_fast.heads import DraftHeads  # noqa: E402
from hydra_fast.model import HydraModel  # noqa: E402


def tiny_families(report):
    from test_engine import FAMILIES, V, perturbed_heads, tiny

    for family in sorted(FAMILIES):
        base = tiny(family).cuda()
        ids = torch.randint(0, V, (1, 9), device="cuda")
        ref = base.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=None, pad_token_id=0)
        row = {"plain": torch.equal(HydraModel(base, None, max_cache_len=256).generate(ids, max_new_tokens=40), ref)}
        for kind in ("medusa", "hydra", "hydra++"):
            heads = perturbed_heads(base.cpu(), kind).cuda()
            base.cuda()
            out = HydraModel(base, heads, max_cache_len=256).generate(ids, max_new_tokens=40)
            row[kind] = torch.equal(out, ref)
        report["tiny_fp32_cuda_equal"][family] = row
        print("tiny", family, row, flush=True)


def real_model(args, report):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).cuda().eval()
    rows = [json.loads(x) for x in Path(args.mt_bench).read_text().splitlines() if x.strip()][: args.prompts]
    prompts = [tok.apply_chat_template([{"role": "user", "content": r["turns"][0]}], add_generation_prompt=True,
                                       return_tensors="pt", return_dict=True)["input_ids"].cuda() for r in rows]
    modes = {"plain": None}
    for kind in ("medusa", "hydra", "hydra++"):
        d = Path(args.heads_dir) / heads_dir_name(kind) if args.heads_dir else None
        modes[kind] = (DraftHeads.from_pretrained(d, base) if d and d.exists()
                       else DraftHeads.from_base(base, kind))
    results = {m: {"tok_s": [], "tau": [], "step_ms": [], "identical": 0, "first_div": []} for m in modes}
    results["hf_generate"] = {"tok_s": []}
    refs = []
    for i, ids in enumerate(prompts):
        if i < args.hf_prompts:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            ref = base.generate(ids, max_new_tokens=args.new_tokens, do_sample=False)
            torch.cuda.synchronize()
            results["hf_generate"]["tok_s"].append((ref.shape[1] - ids.shape[1]) / (time.perf_counter() - t0))
        else:
            ref = base.generate(ids, max_new_tokens=args.new_tokens, do_sample=False)
        refs.append(ref[0, ids.shape[1]:].tolist())
    for mode, heads in modes.items():
        model = HydraModel(base, heads, max_cache_len=2048)
        model.generate(prompts[0], max_new_tokens=8)  # capture the graph outside the timings
        for ids, ref in zip(prompts, refs):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=args.new_tokens, return_dict_in_generate=True)
            dt = time.perf_counter() - t0
            new = out.sequences[0, ids.shape[1]:].tolist()
            r = results[mode]
            r["tok_s"].append(len(new) / dt)
            steps = out.accept_lengths[0]
            r["tau"].append(sum(steps) / len(steps))
            r["step_ms"].append(1000 * statistics.median(out.step_times))
            div = first_divergence(new, ref)
            r["identical"] += div is None
            if div is not None:
                r["first_div"].append(div)
        print(mode, {k: (statistics.median(v) if isinstance(v, list) and v else v) for k, v in results[mode].items()},
              flush=True)
    summary = {}
    for mode, r in results.items():
        summary[mode] = {k: (statistics.median(v) if v else None) if isinstance(v, list) and k != "first_div" else v
                         for k, v in r.items()}
        if "first_div" in r:
            summary[mode]["mean_first_div"] = statistics.mean(r["first_div"]) if r["first_div"] else None
            summary[mode]["prompts"] = len(prompts)
    report["smollm2_bf16"] = summary


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None, help="HF folder of the real model (needed unless --tiny-only)")
    p.add_argument("--mt-bench", default=str(ROOT.parent / "shared" / "data" / "mt_bench.jsonl"))
    p.add_argument("--prompts", type=int, default=10)
    p.add_argument("--hf-prompts", type=int, default=3, help="prompts on which HF generate is timed")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--heads-dir", default=None)
    p.add_argument("--out", default="e2e.json")
    p.add_argument("--skip-tiny", action="store_true")
    p.add_argument("--tiny-only", action="store_true", help="only the tiny fp32 models")
    args = p.parse_args()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tiny_fp32_cuda_equal": {},
              "date": time.strftime("%Y-%m-%d")}
    import hydra_fast

    report["build_info"] = hydra_fast.build_info()
    if not args.skip_tiny:
        try:
            tiny_families(report)
        except Exception as e:  # keep going: the real-model numbers are worth having
            report["tiny_error"] = repr(e)
            print("tiny failed:", repr(e), flush=True)
    if not args.tiny_only:
        if args.model is None:
            p.error("--model is required unless --tiny-only")
        real_model(args, report)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report.get("smollm2_bf16", report["tiny_fp32_cuda_equal"]), indent=1))


if __name__ == "__main__":
    main()

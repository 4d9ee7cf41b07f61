"""Where a decoding step's time goes: torch.profiler around real ``generate`` calls, kernel time per step by name.

    python bench/profile_decode.py --kind hydra++ --tree auto --context-draft 8 \
        --prompts bench/prompts/heldout.jsonl --num-prompts 8

On CUDA each CUDA kernel's device time is summed by kernel name over the profiled calls and divided by their
decoding steps (prefills included in the sums, a few percent at 128 new tokens); set ``HYDRA_FAST_PDL=0`` first
so that kernel durations do not overlap (with programmatic dependent launch a kernel's time includes its wait for
the one before). On the CPU the rows are top-level aten and hydra_fast ops and their CPU time. The model is warmed
up on the first two prompts (graph capture, compile) before the profiled calls. Writes a Markdown table and JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402
from decode_methods import OUR_KINDS, load_base, load_prompts, resolve_heads  # noqa: E402
from step_profile import top_level  # noqa: E402

OPS = ("aten::", "hydra_fast::")


def kernel_table(prof, cuda: bool) -> dict[str, list]:
    """{name: [calls, microseconds]} of the profile's CUDA kernels (memcpy/memset included, labelled by the
    profiler) or, on the CPU, its top-level ops (aten and hydra_fast ops not called by another such op)."""
    table: dict[str, list] = {}
    for evt in prof.events():
        if cuda:
            if evt.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = evt.device_time_total
        else:
            if not top_level(evt, OPS):
                continue
            us = evt.cpu_time_total
        row = table.setdefault(evt.name, [0, 0.0])
        row[0] += 1
        row[1] += us
    return table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF model folder (default: hydra_fast.hub.default_model_path())")
    ap.add_argument("--tiny-random", action="store_true", help="a tiny random Llama and random prompts (no files)")
    ap.add_argument("--heads-dir", default=None, help="folder with medusa/ hydra/ hydra_pp/ heads (default: shipped)")
    ap.add_argument("--kind", default="hydra++", choices=sorted(OUR_KINDS), help="plain: no heads")
    ap.add_argument("--draft-vocab", type=int, default=None, metavar="N")
    ap.add_argument("--tree", default="auto", help="as generate's tree (auto, a preset, dynamic:...)")
    ap.add_argument("--context-draft", type=int, default=0, metavar="M")
    ap.add_argument("--prompts", default=None, help="jsonl rows with \"turns\" or \"prompt\" (default: MT-Bench)")
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--no-cuda-graph", action="store_true")
    ap.add_argument("--top", type=int, default=30, help="rows of the table")
    ap.add_argument("--json", type=Path, default=C.REPO / "out" / "profile_decode.json")
    ap.add_argument("--md", type=Path, default=None, help="default: --json with .md")
    args = ap.parse_args(argv)
    if args.num_prompts < 1 or args.max_new_tokens < 1 or args.top < 1:
        ap.error("--num-prompts, --max-new-tokens and --top must be >= 1")
    if args.context_draft < 0:
        ap.error("--context-draft must be >= 0")
    hydra_fast, device, dtype = C.setup_run(args)
    args.reference_ops = False
    from torch.profiler import ProfilerActivity, profile

    from hydra_fast.model import HydraModel, resolve_tree

    notes: dict[str, str] = {}
    base, tok, model_id = load_base(args, device, dtype)
    prompts = [ids.to(device) for _, ids in load_prompts(args, tok, notes)[0]]
    kind = OUR_KINDS[args.kind]
    heads, heads_label = (None, "none") if kind is None else resolve_heads(kind, base, args, notes)
    longest = max(ids.shape[1] for ids in prompts)
    max_cache_len = (longest + args.max_new_tokens + 64 + args.context_draft + 8 + 63) // 64 * 64
    # "auto": the heads folder's tree for this device, as from_pretrained and bench_decode resolve it
    tree = resolve_tree(args.tree, Path(heads_label) if heads_label not in ("untrained", "none") else None, device)
    model = HydraModel(base, heads, tree=tree, max_cache_len=max_cache_len, cuda_graph=not args.no_cuda_graph)
    gen = dict(max_new_tokens=args.max_new_tokens, context_draft=args.context_draft, return_dict_in_generate=True)

    for ids in prompts[:2]:  # warm-up: graph capture for the prompt lengths seen first, lazy builds
        model.generate(ids, **gen)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    steps = new_tokens = 0
    C.sync(device)
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for ids in prompts:
            out = model.generate(ids, **gen)
            steps += len(out.accept_lengths[0])
            new_tokens += out.sequences.shape[1] - ids.shape[1]
        C.sync(device)
    wall_s = time.perf_counter() - t0
    table = kernel_table(prof, cuda)
    total_us = sum(us for _, us in table.values())
    rows = sorted(table.items(), key=lambda kv: -kv[1][1])
    what = "CUDA kernels" if cuda else "top-level ops"
    meta = C.run_metadata(device, hydra_fast)
    meta.update(model=model_id, dtype=str(dtype).removeprefix("torch."), kind=args.kind, heads=heads_label,
                tree=args.tree, tree_nodes=model.default_tree.num_nodes, context_draft=args.context_draft,
                prompts=len(prompts), max_new_tokens=args.max_new_tokens, what=what,
                pdl=os.environ.get("HYDRA_FAST_PDL", "1") != "0")
    per = 1.0 / max(steps, 1)
    report = dict(meta=meta, notes=notes, steps=steps, new_tokens=new_tokens, tau=new_tokens * per,
                  profiled_wall_ms_per_step=wall_s * 1e3 * per, time_us_per_step=total_us * per,
                  count_per_step=sum(c for c, _ in table.values()) * per,
                  rows=[dict(name=n, calls_per_step=c * per, us_per_step=us * per) for n, (c, us) in rows])

    lines = [f"## profile_decode: {model_id} {meta['dtype']} on {meta.get('device_name', device.type)} "
             f"({meta.get('date', '')}), {args.kind} ({heads_label}), tree {args.tree} "
             f"({meta['tree_nodes']} nodes), context draft {args.context_draft}",
             "",
             f"{len(prompts)} prompts, {steps} steps, {new_tokens} new tokens (tau {report['tau']:.2f}); "
             f"{what}: {report['time_us_per_step']:.1f} us and {report['count_per_step']:.0f} a step"
             + ("" if not cuda else f"; programmatic dependent launch {'on' if meta['pdl'] else 'off'}"),
             "",
             C.md_table(["us / step", "calls / step", "share", "name"],
                        [[f"{r['us_per_step']:.2f}", f"{r['calls_per_step']:.1f}",
                          f"{100 * r['us_per_step'] / max(report['time_us_per_step'], 1e-9):.1f}%",
                          r["name"][:110].replace("|", "/")] for r in report["rows"][:args.top]])]
    text = "\n".join(lines) + "\n"
    print(text)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1, default=str))
    (args.md or args.json.with_suffix(".md")).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""One call that makes the default head sets: self-distilled data, then medusa, hydra and hydra++ trained
together (same data, same steps) on a wall-clock budget, each saved in bf16 with its model card.

    hydra-fast-train default-heads --model DIR --out OUT --prompts 4000 --max-new-tokens 256 \\
        --time-budget 480 [--pack-dir $OUT]

The budget covers everything (loading, data, training, evaluation, saving): data gets ``--data-fraction`` of
it, training what is left minus ``--reserve`` seconds for evaluation and saving. A kind that fails is reported
and the others are still saved. ``--pack-dir`` also writes the saved sets as one tar split into parts under
15 MiB (``cat heads.tar.* | tar -x``), for transports that limit the number and size of files.
"""
from __future__ import annotations

import argparse
import json
import sys
import tarfile
import time
import traceback
from pathlib import Path

PART_BYTES = 15 * 1024 * 1024
MAX_SET_MB = 40.0


def add_args(p: argparse.ArgumentParser) -> None:
    from hydra_fast.train.cli import _common, add_data_args, add_fit_args

    _common(p)
    p.add_argument("--out", required=True, help="output folder: one folder per kind + summary.json")
    p.add_argument("--work", default=None, help="data and checkpoints (default: OUT/_work)")
    p.add_argument("--prompts", type=int, default=4000, help="prompts to answer (default: half builtin, half "
                                                             "stdlib code; --source replaces the mix)")
    p.add_argument("--time-budget", type=float, default=480.0, help="seconds for the whole call (default 480)")
    p.add_argument("--data-fraction", type=float, default=0.4, help="share of the budget for data (default 0.4)")
    p.add_argument("--reserve", type=float, default=30.0, help="seconds kept for evaluation and saving")
    p.add_argument("--pack-dir", default=None, help="also write heads.tar.NNN parts (< 15 MiB) here")
    p.add_argument("--data-workers", type=int, default=1,
                   help="processes answering prompts side by side on this device (default 1; a small model's "
                        "generation is bound by host time, so 3-4 finish the data that much sooner)")
    add_data_args(p)
    add_fit_args(p)
    # HF generate on a small model is bound by host time per step, not by batch size: big batches are cheap
    p.set_defaults(kinds="medusa,hydra,hydra++", steps=100_000, batch_size=16, max_len=768, gen_batch_size=512,
                   shard_size=512, eval_fraction=0.03, ckpt_every=0, log_every=20)


def _sources(args) -> list[str]:
    if args.source:
        return args.source
    half = max(1, args.prompts // 2)
    return [f"builtin:{half}", f"stdlib:{max(1, args.prompts - half)}"]


def _set_sizes(out: Path, saved: dict) -> dict[str, float]:
    return {k: round(sum(f.stat().st_size for f in Path(d).glob("model*.safetensors")) / 1e6, 2)
            for k, d in saved.items()}


def _pack(out: Path, saved: dict, pack_dir: Path) -> list[str]:
    """Tar the saved kind folders (and summary.json) and split the tar into parts under 15 MiB."""
    pack_dir.mkdir(parents=True, exist_ok=True)
    tar_path = pack_dir / "heads.tar"
    with tarfile.open(tar_path, "w") as tar:
        for d in saved.values():
            tar.add(d, arcname=Path(d).name)
        if (out / "summary.json").exists():
            tar.add(out / "summary.json", arcname="summary.json")
    parts = []
    with open(tar_path, "rb") as f:
        for i, chunk in enumerate(iter(lambda: f.read(PART_BYTES), b"")):
            part = pack_dir / f"heads.tar.{i:03d}"
            part.write_bytes(chunk)
            parts.append(part.name)
    tar_path.unlink()
    if (out / "summary.json").exists():
        (pack_dir / "summary.json").write_bytes((out / "summary.json").read_bytes())
    return parts


def run(args) -> int:
    from hydra_fast.train import cli
    from hydra_fast.train.dataset import DataError, SelfDistillData
    from hydra_fast.train.trainer import Trainer

    t0 = time.monotonic()
    out = Path(args.out)
    work = Path(args.work) if args.work else out / "_work"
    out.mkdir(parents=True, exist_ok=True)
    base, tok = cli.load_base(args)
    args.source = _sources(args)
    data_budget = max(args.time_budget * args.data_fraction - (time.monotonic() - t0), 1.0)
    if args.data_workers < 1:
        raise DataError(f"--data-workers must be at least 1, got {args.data_workers}")
    manifest = cli.build_data(args, lambda: (base, tok), work / "data", data_budget, args.data_workers)
    t_data = time.monotonic() - t0
    data = SelfDistillData(work / "data", base, max_len=args.max_len)
    train_seconds = args.time_budget - (time.monotonic() - t0) - args.reserve
    if train_seconds <= 0:
        print(f"hydra_fast.train: no time left to train after {t_data:.0f} s of data; raise --time-budget",
              file=sys.stderr)
        return 1
    config = cli.train_config(args, [k.strip() for k in args.kinds.split(",") if k.strip()],
                              max_seconds=train_seconds)
    trainer = Trainer(base, data, config, work / "train", command=cli._command(), progress=not args.quiet)
    try:
        summary = trainer.fit(resume=False)
    except Exception:  # the loop itself broke: still save whatever trained so far
        print(traceback.format_exc(), file=sys.stderr)
        summary = {"step": trainer.step, "seconds": round(trainer.elapsed(), 1), "crashed": True,
                   "failed": {s.recipe.kind: s.failed for s in trainer.sets if s.failed}}
        summary["saved"] = trainer.save_heads()
    saved = {}
    for kind, d in summary.get("saved", {}).items():  # move <work>/train/<kind> to <out>/<kind>
        target = out / Path(d).name
        if target.exists():
            for f in target.iterdir():
                f.unlink()
            target.rmdir()
        Path(d).rename(target)
        saved[kind] = str(target)
    sizes = _set_sizes(out, saved)
    report = {
        "samples": len(data), "data_complete": manifest["complete"], "data_seconds": round(t_data, 1),
        "train_steps": summary["step"], "train_seconds": summary["seconds"], "total_seconds":
        round(time.monotonic() - t0, 1), "saved": saved, "size_mb": sizes, "failed": summary.get("failed", {}),
        "too_big": [k for k, mb in sizes.items() if mb > MAX_SET_MB],
        "eval_top1": {k: [round(h["top1"], 4) for h in v] for k, v in summary.get("eval", {}).items()},
        "eval_top5": {k: [round(h["top5"], 4) for h in v] for k, v in summary.get("eval", {}).items()},
    }
    (out / "summary.json").write_text(json.dumps(report, indent=2))
    if args.pack_dir:
        report["parts"] = _pack(out, saved, Path(args.pack_dir))
    print(f"hydra_fast.train default heads: {len(data)} samples ({t_data:.0f} s), {summary['step']} steps "
          f"({summary['seconds']} s), total {report['total_seconds']} s")
    for kind in config.kinds():
        top1 = " ".join(f"{a:.3f}" for a in report["eval_top1"].get(kind, []))
        state = (f"FAILED: {report['failed'][kind]}" if kind in report["failed"]
                 else f"{sizes.get(kind, 0):.1f} MB -> {saved.get(kind, 'not saved')}")
        print(f"  {kind:8s} top-1 per head: {top1 or '-':32s} {state}")
    if report["too_big"]:
        print(f"  over {MAX_SET_MB:.0f} MB: {', '.join(report['too_big'])}")
    return 0 if saved and not report["failed"] else 1

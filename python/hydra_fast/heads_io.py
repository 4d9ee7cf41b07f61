"""A heads folder on disk: its file names, the check that a folder may be saved into, and reading its weights
(one safetensors file or an index of shards), each failure a ``HeadsCheckpointError`` that names the file."""
from __future__ import annotations

import json
import os

import torch

from hydra_fast.heads_config import HeadsCheckpointError, HeadsConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def is_weights_file(name: str) -> bool:
    return name == CONFIG_NAME or name == INDEX_NAME or (name.startswith("model") and name.endswith(".safetensors"))


def check_heads_folder(directory: str | os.PathLike) -> None:
    """HeadsCheckpointError unless ``directory`` is absent, empty of weights, or a heads folder."""
    directory = os.fspath(directory)
    if not os.path.exists(directory):
        return
    if not os.path.isdir(directory):
        raise HeadsCheckpointError(f"{directory} is a file, not a folder: save heads into a folder")
    config_path = os.path.join(directory, CONFIG_NAME)
    if os.path.exists(config_path):
        try:
            with open(config_path) as f:
                HeadsConfig.from_dict(json.load(f))
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise HeadsCheckpointError(f"{directory} holds a config.json that is not a heads config ({e}); "
                                       "refusing to overwrite it: save the heads into their own folder") from None
        return
    weights = [n for n in os.listdir(directory) if n.endswith((".safetensors", ".bin", ".pt", ".pth", ".gguf"))]
    if weights:
        raise HeadsCheckpointError(f"{directory} holds weights that are not heads ({', '.join(sorted(weights)[:3])}); "
                                   "refusing to overwrite them: save the heads into their own folder")


def read_weights(directory: str, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor of expected, from the single file or the shards of the index; errors name the file."""
    from safetensors.torch import load_file

    index_path = os.path.join(directory, INDEX_NAME)
    if os.path.exists(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise HeadsCheckpointError(f"{index_path}: unreadable shard index ({type(e).__name__}: {e})") from e
    else:
        weight_map = dict.fromkeys(expected, WEIGHTS_NAME)
    state = {}
    for filename in sorted(set(weight_map.values())):
        path = os.path.join(directory, filename)
        if not os.path.exists(path):
            raise HeadsCheckpointError(f"{path}: missing weights file")
        try:
            tensors = load_file(path)
        except Exception as e:  # safetensors raises its own error types for truncated or garbled files
            raise HeadsCheckpointError(f"{path}: not a readable safetensors file ({e})") from e
        for name, t in tensors.items():
            if name not in expected:
                raise HeadsCheckpointError(f"{path}: unexpected tensor {name!r} (not part of these heads)")
            if t.shape != expected[name].shape:
                raise HeadsCheckpointError(f"{path}: tensor {name!r} has shape {tuple(t.shape)}, expected "
                                           f"{tuple(expected[name].shape)}")
            state[name] = t
    missing = [n for n in expected if n not in state]
    if missing:
        where = sorted({weight_map.get(n, WEIGHTS_NAME) for n in missing})
        raise HeadsCheckpointError(f"{os.path.join(directory, where[0])}: missing tensors {missing[:5]}"
                                   f"{' ...' if len(missing) > 5 else ''}")
    return state

"""Differences between the transformers versions we support (5.17 on the GPU image, newer elsewhere)."""
from __future__ import annotations

import functools
import inspect

from transformers.models.llama.modeling_llama import LlamaModel


@functools.cache
def cache_kwarg() -> str:
    """The keyword modeling code takes the cache under: ``cache`` from 5.24, ``past_key_values`` before."""
    params = inspect.signature(LlamaModel.forward).parameters
    return "cache" if "cache" in params else "past_key_values"

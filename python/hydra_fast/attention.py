"""Tree attention plugged into stock transformers models through their attention-function registry.

``register()`` adds the implementation ``"hydra_tree"``; ``use_tree_attention(model)`` selects it for the
duration of a block. The verify forward passes a ``TreeAttention`` context as the keyword argument
``hydra_tree``; modeling code forwards unknown keyword arguments to the attention function untouched.
Without that argument (a plain HF call while the implementation is selected) it falls back to SDPA.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

NAME = "hydra_tree"


@dataclass(frozen=True)
class TreeAttention:
    """What one verify forward's attention needs besides Q, K and V."""

    lens: torch.Tensor  # int32 [B]: cached tokens before this forward's N new ones
    tree_mask: torch.Tensor  # bool [N, N] or per sequence [B, N, N]: row i = the new tokens query i may see
    impl: object  # module with tree_attention (hydra_fast.ops kernels or hydra_fast.reference)


def hydra_tree_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    ctx = kwargs.get(NAME)
    if ctx is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    out = ctx.impl.tree_attention(query, key, value, ctx.lens, ctx.tree_mask, float(scaling))  # [B, N, Hq, D]
    return out, None


@functools.cache
def register() -> str:
    AttentionInterface.register(NAME, hydra_tree_attention)
    return NAME


@contextlib.contextmanager
def use_tree_attention(model: torch.nn.Module):
    """Select ``hydra_tree`` on ``model.config`` inside the block, restoring the previous choice after.

    ``register()`` must have run (the engine does it at construction, outside any traced code)."""
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = previous

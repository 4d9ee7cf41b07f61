"""The rotary embedding as a table over cache positions: a step gathers rows instead of recomputing cos and sin.

HF's rotary module recomputes cos and sin at every call (the inv_freq matmul, a concatenation, cos, sin, the
attention scaling and the casts: about 8 kernels per call, twice a step with the Hydra++ prefix layer). For rope
types whose values at a position depend on that position alone, ``RopeTable`` holds the module's own output at
positions 0 .. capacity - 1, computed once when the engine is built (before any CUDA-graph capture), so a row
gathered from it is bitwise what the module returns for that position: a clamp and one gather a call.

Rope types whose frequencies change with the sequence length ("dynamic" NTK, "longrope") or that this file does
not know keep calling the module at every step (``rotary_positions`` returns the module itself).
"""
from __future__ import annotations

import torch
from torch import nn

# Rotary modules whose forward is HF's ``cos(pos * inv_freq) * attention_scaling`` (transformers 5.x), and the
# rope types for which inv_freq and attention_scaling are fixed at init (``dynamic_rope_update`` leaves them be).
_ROTARY_CLASSES = ("LlamaRotaryEmbedding", "Qwen2RotaryEmbedding", "Qwen3RotaryEmbedding", "MistralRotaryEmbedding")
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def not_tabulable(rotary: nn.Module) -> str:
    """Why ``rotary``'s output cannot be tabulated by position ("" when it can)."""
    if type(rotary).__name__ not in _ROTARY_CLASSES:
        return f"{type(rotary).__name__} is not one of {_ROTARY_CLASSES}"
    rope_type = getattr(rotary, "rope_type", None)
    if rope_type not in STATIC_ROPE_TYPES:
        return f"rope type {rope_type!r} is not one whose values depend on the position alone {STATIC_ROPE_TYPES}"
    return ""


class RopeTable:
    """cos and sin of ``rotary`` at positions 0 .. capacity - 1, in ``dtype`` on ``device``.

    Called like the module: (hidden [B, N, d], position_ids int64 [B, N]) -> (cos, sin) [B, N, D] each, equal
    bit for bit to ``rotary(hidden, position_ids)`` at positions below capacity. Positions at or past capacity
    (only a finished sequence of a batch gets there: ``generate`` checks that the others fit) read the last row,
    as the cache writes their K/V into its last slot. A hidden state of another dtype or device than the table's
    goes to the module."""

    def __init__(self, rotary: nn.Module, capacity: int, dtype: torch.dtype, device: torch.device):
        why = not_tabulable(rotary)
        if why:
            raise ValueError(f"cannot tabulate the rotary embedding: {why}; call the module instead")
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.rotary = rotary
        self.capacity = capacity
        positions = torch.arange(capacity, device=device).view(1, capacity)  # [1, S]
        probe = torch.empty(1, 1, 1, dtype=dtype, device=device)  # the module reads only its dtype and device
        with torch.no_grad():
            cos, sin = rotary(probe, positions)  # [1, S, D] each
        self.table = torch.stack([cos[0], sin[0]])  # [2, S, D]: one gather serves both

    def __call__(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if hidden.dtype != self.table.dtype or hidden.device != self.table.device:
            return self.rotary(hidden, position_ids)
        rows = self.table[:, position_ids.clamp(max=self.capacity - 1)]  # [2, B, N, D]
        return rows[0], rows[1]


def rotary_positions(rotary: nn.Module, capacity: int, dtype: torch.dtype, device: torch.device):
    """A ``RopeTable`` of ``rotary`` when its values depend on the position alone, else ``rotary`` itself: either
    way a callable (hidden, position_ids) -> (cos, sin) that returns what ``rotary`` returns."""
    if not_tabulable(rotary):
        return rotary
    return RopeTable(rotary, capacity, dtype, device)

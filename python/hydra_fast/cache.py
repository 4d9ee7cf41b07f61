"""A static, GQA-aware KV cache for every layer in one tensor pair, with lengths on the device.

Stock transformers attention modules call ``cache.update(k, v, layer_idx)``; this cache writes the new
K/V into slots [len, len + N) of its layer and hands back the whole static buffer, which the tree
attention function (``attention.py``) reads up to ``len + N``. Accepted tree nodes are moved into place
by ``kv_compact`` over all layers in one launch, and ``lens`` advances on the device: no host reads.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache


class TreeKVCache(Cache):
    """K and V of ``num_layers`` layers: ``k``, ``v`` [L, B, Hkv, S, D]; ``lens`` int32 [B]."""

    def __init__(self, num_layers: int, batch_size: int, kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device | str, lens: torch.Tensor | None = None):
        super().__init__(layers=[])
        shape = (num_layers, batch_size, kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [L, B, Hkv, S, D]
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        # Shared with another cache when two caches always hold the same tokens (the Hydra++ prefix layer).
        self.lens = lens if lens is not None else torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.capacity = capacity
        self.num_layers = num_layers

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """Write [B, Hkv, N, D] at slots [len, len + N) of ``layer_idx``; return the layer's full buffers."""
        B, H, N, D = key_states.shape
        slots = self.lens.to(torch.long).view(B, 1) + torch.arange(N, device=key_states.device).view(1, N)
        index = slots.clamp(max=self.capacity - 1).view(B, 1, N, 1).expand(B, H, N, D)  # [B, Hkv, N, D]
        k_layer, v_layer = self.k[layer_idx], self.v[layer_idx]  # [B, Hkv, S, D]
        k_layer.scatter_(2, index, key_states.to(k_layer.dtype))
        v_layer.scatter_(2, index, value_states.to(v_layer.dtype))
        return k_layer, v_layer

    def get_seq_length(self, layer_idx: int = 0) -> int:
        raise RuntimeError("TreeKVCache keeps its lengths on the device; pass explicit position_ids")

    def reset(self) -> None:
        self.lens.zero_()

    @property
    def is_compileable(self) -> bool:
        return True

    def __len__(self) -> int:
        return self.num_layers

    def __repr__(self) -> str:
        L, B, H, S, D = self.k.shape
        return f"TreeKVCache(layers={L}, batch={B}, kv_heads={H}, capacity={S}, head_dim={D}, dtype={self.k.dtype})"

"""``linear``: F.linear, with the one CPU shape where another product order is much faster.

On the CPU, a few rows (2-64: a draft tree's nodes, a head level's parents) times a large weight (an LM head,
V x d with V in the tens of thousands) is memory-bound: the weight should stream through once. MKL's sgemm
does that for ``weight @ x.T`` (a tall matrix times a few columns), but not for ``x @ weight.T``, which it
runs 1.4-3.8x slower at 2-16 rows (measured on 2 cores, fp32, SmolLM2's 49152 x 576 LM head: 4 rows 30-33 ms
against 9-10 ms; `bench/RESULTS.md`). Weights that fit in the caches showed no consistent winner, so they keep
F.linear. The two orders are the same product; only the summation order inside the GEMM differs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# A weight at least this large is read from memory at every product (beyond any CPU's caches).
LARGE_WEIGHT_BYTES = 32 << 20
MAX_ROWS = 64


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., d] @ weight [n, d].T + bias [n] -> [..., n], as F.linear."""
    rows = x.numel() // max(x.shape[-1], 1)
    if (x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32
            or not 2 <= rows <= MAX_ROWS or weight.numel() * weight.element_size() < LARGE_WEIGHT_BYTES):
        return F.linear(x, weight, bias)
    out = torch.mm(weight, x.reshape(rows, x.shape[-1]).t()).t()  # [rows, n] (a transposed view)
    if bias is not None:
        out = out + bias
    return out.contiguous().view(*x.shape[:-1], weight.shape[0])


def lm_head_logits(lm_head: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An LM head module's logits for x [..., d]: ``linear`` on a plain nn.Linear, the module itself otherwise."""
    if type(lm_head) is torch.nn.Linear:
        return linear(x, lm_head.weight, lm_head.bias)
    return lm_head(x)

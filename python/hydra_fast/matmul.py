"""``linear``: F.linear, with the CPU shapes where another product order is much faster.

On the CPU, a few rows (1-64: a plain step's last hidden state, a draft tree's nodes, a head level's parents) times
a large weight (an LM head, or a draft vocabulary's compact LM head: V x d with V in the thousands) is memory-bound:
the weight should stream through once, on every core. MKL's sgemm does that for ``weight @ x.T`` (a tall matrix
times a few columns), but not for ``x @ weight.T``; and for one row its GEMV streams the weight on one core. So:
2-64 rows take ``weight @ x.T``, and one row takes it with the row twice (a two-column product, split over the
cores; the duplicate costs arithmetic, not bytes). Measured on 2 cores, fp32, d = 576 (medians, ms; F.linear /
this):

| weight | 1 row | 2 rows | 4 rows | 8 rows |
|---|---|---|---|---|
| 3072 x 576 (6.8 MB) | 0.26 / - | 0.54 / 0.50 | 0.71 / 0.64 | 2.14 / 1.24 |
| 4096 x 576 (9.0 MB) | 0.38 / - | 1.26 / 0.73 | 2.81 / 0.82 | 3.27 / 1.67 |
| 6592 x 576 (14.5 MB) | 2.30 / 1.46 | 6.04 / 1.35 | 5.12 / 1.73 | 5.43 / 2.97 |
| 49152 x 576 (108 MB) | 17.2 / 11.2 | 41.4 / 14.0 | 45.2 / 15.1 | 53.7 / 24.6 |

Below ``LARGE_WEIGHT_BYTES`` F.linear stays: at 6.8 MB the two orders were within 10 % at 2-4 rows (the rows of
a small tree), and smaller weights were not measured; the one-row form needs more than one thread. The orders are
the same product; only the summation order inside the GEMM differs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# A weight at least this large is read from memory at every product (beyond the caches of the CPU measured).
LARGE_WEIGHT_BYTES = 8 << 20
MAX_ROWS = 64


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., d] @ weight [n, d].T + bias [n] -> [..., n], as F.linear."""
    rows = x.numel() // max(x.shape[-1], 1)
    if (x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32
            or not 1 <= rows <= MAX_ROWS or weight.numel() * weight.element_size() < LARGE_WEIGHT_BYTES
            or (rows == 1 and torch.get_num_threads() < 2)):
        return F.linear(x, weight, bias)
    x2 = x.reshape(rows, x.shape[-1])
    if rows == 1:
        out = torch.mm(weight, x2.expand(2, -1).contiguous().t())[:, :1].t()  # [1, n]: the row twice, one kept
    else:
        out = torch.mm(weight, x2.t()).t()  # [rows, n] (a transposed view)
    if bias is not None:
        out = out + bias
    return out.contiguous().view(*x.shape[:-1], weight.shape[0])


def lm_head_logits(lm_head: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An LM head module's logits for x [..., d]: ``linear`` on a plain nn.Linear, the module itself otherwise."""
    if type(lm_head) is torch.nn.Linear:
        return linear(x, lm_head.weight, lm_head.bias)
    return lm_head(x)

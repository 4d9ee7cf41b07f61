"""The target distribution of sampled decoding: temperature, top-k and top-p applied to the base's logits.

Order as HF's logits processors: logits / temperature, then top-k (ties with the k-th logit kept), then the
top-p nucleus of what is left, then softmax. Lossless tree sampling (``accept_sample``) and the prefill's first
token both sample from these probabilities; typical acceptance reads the filtered logits.
Static shapes, no host reads: safe inside a captured step.
"""
from __future__ import annotations

import torch

# Logit given to tokens outside the nucleus: far below any real logit, yet finite after division by the
# temperature, so 0 * log p stays 0 in the entropy (an infinite logit would make it NaN).
_OUTSIDE_NUCLEUS = -1e30


def top_p_filter(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Logits [..., V] (float32) whose softmax at ``temperature`` is the renormalised ``top_p`` nucleus:
    the fewest most likely tokens whose probability adds up to at least top_p (the top token always)."""
    scaled = logits.float() / temperature
    sorted_logits, order = scaled.sort(dim=-1, descending=True)  # [..., V]
    probs = sorted_logits.softmax(-1)
    outside = (probs.cumsum(-1) - probs) >= top_p  # mass before this token already reaches top_p
    kept = torch.where(outside, torch.full_like(sorted_logits, _OUTSIDE_NUCLEUS), sorted_logits * temperature)
    return torch.empty_like(kept).scatter_(-1, order, kept)


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Logits [..., V] (float32) with every token below the k-th largest logit pushed out (ties kept, as HF)."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits.float()
    kth = torch.topk(logits.float(), top_k, dim=-1).values[..., -1:]  # [..., 1]
    return torch.where(logits.float() < kth, torch.full_like(logits.float(), _OUTSIDE_NUCLEUS), logits.float())


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Logits [..., V] (float32) whose softmax at ``temperature`` is the target distribution."""
    out = top_k_filter(logits, top_k)
    return top_p_filter(out, temperature, top_p) if top_p < 1.0 else out


def target_probs(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The target distribution [..., V] (float32): softmax(filter(logits) / temperature)."""
    return torch.softmax(filter_logits(logits, temperature, top_k, top_p) / temperature, dim=-1)


def inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One token per row of probs [B, V] from uniform [B] in [0, 1): the first index whose CDF exceeds u * total
    (the bonus-token rule of ``accept_sample``). -> int64 [B]"""
    cdf = probs.double().cumsum(-1)  # [B, V]
    target = uniform.double().view(-1, 1) * cdf[:, -1:]
    return (cdf <= target).sum(-1).clamp(max=probs.shape[-1] - 1)

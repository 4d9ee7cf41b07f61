"""The target distribution of sampled decoding: temperature, top-k and top-p applied to the base's logits.

Order as HF's logits processors: logits / temperature, then top-k (ties with the k-th logit kept), then the
top-p nucleus of what is left, then softmax. Lossless tree sampling (``accept_sample``) and the prefill's first
token both sample from these probabilities; typical acceptance reads the filtered logits.

On CUDA and under torch.compile: static shapes, no host reads, safe inside a captured step (the nucleus by a
full sort of every row). On the CPU in eager mode the nucleus is looked for among each row's few most likely
tokens first (a partial sort, reading the host), with the same result.
"""
from __future__ import annotations

import torch

# Logit given to tokens outside the nucleus: far below any real logit, yet finite after division by the
# temperature, so 0 * log p stays 0 in the entropy (an infinite logit would make it NaN).
_OUTSIDE_NUCLEUS = -1e30

# The CPU's first guess at how many tokens a nucleus needs; rows whose nucleus is larger try 16x as many, and
# so on, then sort the whole row (a partial sort of k values costs far less than a sort of V for k << V).
_FIRST_K = 256
_GROWTH = 16


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Logits [..., V] (float32) whose softmax at ``temperature`` is the target distribution: the tokens that
    top-k or top-p remove get a logit far below any other, the others keep theirs."""
    if not _filters(logits, top_k, top_p):
        return logits.float()
    removed = _filter_(logits.float() / temperature, top_k, top_p) == _OUTSIDE_NUCLEUS  # [..., V]
    return logits.float().masked_fill(removed, _OUTSIDE_NUCLEUS)


def top_p_filter(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """``filter_logits`` with top-p only: the renormalised ``top_p`` nucleus (see ``nucleus_floor``)."""
    return filter_logits(logits, temperature, 0, top_p)


def target_probs(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The target distribution [..., V] (float32): softmax(filter_logits(logits) / temperature), computed
    without a second division (the same numbers: a removed token's probability is 0 either way)."""
    scaled = logits.float() / temperature  # [..., V]
    if _filters(logits, top_k, top_p):
        _filter_(scaled, top_k, top_p)
    return scaled.softmax(-1)


def _filters(logits: torch.Tensor, top_k: int, top_p: float) -> bool:
    return 0 < top_k < logits.shape[-1] or top_p < 1.0


def _filter_(scaled: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k and then top-p, in place on scaled = logits / temperature [..., V] (float32): a removed token's
    logit becomes _OUTSIDE_NUCLEUS. Returns scaled."""
    V = scaled.shape[-1]
    top = None
    if 0 < top_k < V:
        top = scaled.topk(top_k + (top_p < 1.0), dim=-1)  # [..., k (+1: whether the k-th has ties)]
        scaled.masked_fill_(scaled < top.values[..., top_k - 1:top_k], _OUTSIDE_NUCLEUS)  # ties kept, as HF
    if top_p < 1.0:
        probs = scaled.softmax(-1)  # [..., V] after top-k
        if top is not None and _partial_sort(probs) and bool((top.values[..., -1] < top.values[..., -2]).all()):
            # top-k kept exactly k tokens, all among top's k + 1 (the last one, and every other, now has
            # probability 0): their probabilities in descending order are those of the whole row
            floor = _floor_of_sorted(probs.gather(-1, top.indices).sort(dim=-1, descending=True).values, top_p)[0]
        else:
            floor = nucleus_floor(probs, top_p)
        scaled.masked_fill_(probs < floor, _OUTSIDE_NUCLEUS)
    return scaled


def _partial_sort(t: torch.Tensor) -> bool:
    """Whether the nucleus may be looked for by a partial sort that reads the host: on the CPU, eagerly."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def nucleus_floor(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The least probability [..., 1] that the ``top_p`` nucleus of probs [..., V] keeps.

    The nucleus is the fewest most likely tokens whose probability adds up to at least top_p (the top token
    always), with every token tied in probability with the least likely of them: the kept set is
    {p >= floor}, which does not depend on how a sort orders ties (as top-k keeps the ties of its k-th token).
    On the CPU in eager mode it is looked for among the few most likely tokens of each row first
    (``_floor_by_topk``), elsewhere found by a full sort (``_floor_by_sort``); both read the same descending
    probabilities and running sums, so they give the same floor."""
    if _partial_sort(probs):
        return _floor_by_topk(probs, top_p)
    return _floor_by_sort(probs, top_p)


def _floor_of_sorted(sorted_probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """From the k largest probabilities of each row, descending [..., k]: the nucleus' floor [..., 1] and
    whether the nucleus ends inside the k [..., 1] (a token among them lies outside it)."""
    before = sorted_probs.cumsum(-1) - sorted_probs  # the mass of the tokens ranked before each one
    kept = (before < top_p).sum(-1, keepdim=True).clamp(min=1)  # [..., 1]; running sums rise: a prefix
    return sorted_probs.gather(-1, kept - 1), kept < sorted_probs.shape[-1]


def _floor_by_sort(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """``nucleus_floor`` by a full descending sort of every row (static shapes, no host reads)."""
    return _floor_of_sorted(probs.sort(dim=-1, descending=True).values, top_p)[0]


def _floor_by_topk(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """``nucleus_floor`` from the k largest probabilities of each row (torch.topk, a partial sort), k growing
    only for the rows whose nucleus does not end inside them, up to k = V (a full sort). Reads the host."""
    V = probs.shape[-1]
    flat = probs.reshape(-1, V)  # [R, V]
    floor = torch.empty(flat.shape[0], 1, dtype=probs.dtype)  # [R, 1]
    rows, k = None, min(_FIRST_K, V)  # rows: the rows still open (None: all of them)
    while rows is None or rows.numel() > 0:
        part = flat if rows is None else flat[rows]  # [r, V]
        top = part.topk(k, dim=-1).values if k < V else part.sort(dim=-1, descending=True).values  # [r, k]
        f, inside = _floor_of_sorted(top, top_p)  # [r, 1] each
        done = inside.view(-1) | (k == V)
        if rows is None and bool(done.all()):
            return f.view(*probs.shape[:-1], 1)
        rows = torch.arange(flat.shape[0]) if rows is None else rows
        floor[rows[done]] = f[done]
        # an open row's nucleus holds at least k + (top_p - mass of its k) / (k-th probability) tokens: grow k
        # 16x, or sort the open rows where that is not enough or k would come near V (there a sort is faster)
        short = top_p - top[~done].sum(-1, dtype=torch.float64)  # [open]
        least = k + (short / top[~done, -1].double()).max() if bool((~done).any()) else 0.0
        rows, k = rows[~done], (_GROWTH * k if least <= _GROWTH * k <= V // 4 else V)
    return floor.view(*probs.shape[:-1], 1)


def inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One token per row of probs [B, V] from uniform [B] in [0, 1): the first index whose CDF exceeds u * total
    (the bonus-token rule of ``accept_sample``). -> int64 [B]"""
    cdf = probs.double().cumsum(-1)  # [B, V]
    target = uniform.double().view(-1, 1) * cdf[:, -1:]
    return (cdf <= target).sum(-1).clamp(max=probs.shape[-1] - 1)

"""Training objective of draft heads: per-head next-token cross-entropy and teacher distillation.

Head i at position t predicts token t + i + 2 (``DraftHeads.forward_train``). Only positions whose target is
an answer token are scored. The teacher is the base model itself: its distribution for token t + i + 2 is its
output at position t + i + 1, a soft target computed once per batch and shared by every head set.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hydra_fast.heads import DraftHeads
from hydra_fast.train.config import HeadRecipe

STATS = ("ce", "kl", "top1", "top5", "count")  # columns of the per-head statistics, sums over scored rows


@dataclass
class Targets:
    """The scored rows of one batch for every head, and the base model's soft targets."""

    rows: list[torch.Tensor]  # head i: int64 [N_i], flat positions b * T + t whose target is an answer token
    labels: list[torch.Tensor]  # head i: int64 [N_i], the data token at t + i + 2
    teacher_rows: list[torch.Tensor]  # head i: int64 [N_i], row of teacher_logp for position t + i + 1
    teacher_logp: torch.Tensor | None  # fp32 [N_t, V] base log-probabilities (None: no recipe uses them)
    # or, from a data set that cached them: (ids int64 [N_t, k], log-probabilities fp32 [N_t, k]) of the top k
    teacher_top: tuple[torch.Tensor, torch.Tensor] | None = None


@torch.no_grad()
def make_targets(input_ids, answer_mask, num_heads: int, hidden=None, lm_head=None, top=None) -> Targets:
    """input_ids int64 [B, T], answer_mask bool [B, T]; hidden [B, T, d] and lm_head give the teacher, or
    top = (ids int64 [B, T, k], log-probabilities fp32 [B, T, k]) a cached top-k teacher (row p: token p + 1)."""
    B, T = input_ids.shape
    flat = torch.arange(B * T, device=input_ids.device).view(B, T)  # [B, T]
    teacher_logp, teacher_top, row_of = None, None, None
    if hidden is not None or top is not None:
        scored = flat[:, :-1][answer_mask[:, 1:]]  # [N_t] positions p whose next token is an answer token
        if top is not None:
            k = top[0].shape[-1]
            teacher_top = (top[0].reshape(B * T, k)[scored], top[1].reshape(B * T, k)[scored].float())
        else:
            logits = lm_head(hidden.reshape(B * T, -1)[scored])  # [N_t, V]
            teacher_logp = torch.log_softmax(logits.float(), dim=-1)
        row_of = torch.full((B * T,), -1, dtype=torch.long, device=input_ids.device)  # [B*T]
        row_of[scored] = torch.arange(scored.numel(), device=input_ids.device)
    rows, labels, teacher_rows = [], [], []
    for i in range(num_heads):
        s = i + 2
        valid = answer_mask[:, s:]  # [B, T - s]
        r = flat[:, : max(T - s, 0)][valid]  # [N_i]
        rows.append(r)
        labels.append(input_ids[:, s:][valid])
        teacher_rows.append(row_of[r + s - 1] if row_of is not None else r)
    return Targets(rows, labels, teacher_rows, teacher_logp, teacher_top)


def sparse_kl(logp: torch.Tensor, ids: torch.Tensor, t_logp: torch.Tensor) -> torch.Tensor:
    """Summed KL(teacher || head) with the teacher's top-k renormalised: logp [N, V] head log-probabilities,
    ids int64 [N, k] and t_logp fp32 [N, k] the teacher's top k (-inf: empty slot). Exact when k = V."""
    t = t_logp - torch.logsumexp(t_logp, dim=-1, keepdim=True)  # [N, k]
    p = t.exp()
    terms = p * (t - logp.gather(-1, ids))  # [N, k]
    return torch.where(p > 0, terms, torch.zeros_like(terms)).sum()


def perturb(hidden, recipe: HeadRecipe, generator: torch.Generator | None):
    """Input noise (std relative to each row's RMS) and dropout on the hidden states the heads read."""
    if recipe.noise > 0:
        rms = hidden.float().pow(2).mean(-1, keepdim=True).sqrt()  # [B, T, 1]
        noise = torch.randn(hidden.shape, generator=generator, device=hidden.device, dtype=torch.float32)
        hidden = (hidden.float() + noise * rms * recipe.noise).to(hidden.dtype)
    if recipe.dropout > 0:
        keep = torch.rand(hidden.shape, generator=generator, device=hidden.device) >= recipe.dropout
        hidden = hidden * keep.to(hidden.dtype) / (1.0 - recipe.dropout)
    return hidden


class HeadsObjective(nn.Module):
    """One head set and its loss; the module DDP wraps (its forward is the whole per-set computation)."""

    def __init__(self, heads: DraftHeads, recipe: HeadRecipe):
        super().__init__()
        self.heads = heads
        self.recipe = recipe
        self.weights = recipe.head_weights()

    def forward(self, hidden, input_ids, attention_mask, position_embeddings, targets: Targets, embed_weight,
                lm_head, generator=None):
        """hidden [B, T, d] (base last hidden states, no grad). -> (weighted loss, stats fp32 [H, len(STATS)])."""
        if self.training:
            hidden = perturb(hidden, self.recipe, generator)
        B, T, d = hidden.shape
        states = self.heads.train_states(hidden, input_ids, embed_weight, position_embeddings=position_embeddings,
                                         attention_mask=attention_mask)
        w_t = self.recipe.teacher_weight
        total = hidden.new_zeros((), dtype=torch.float32)
        stats = []
        for i, y in enumerate(states):
            x = y.reshape(B * T, d)[targets.rows[i]]  # [N_i, d]
            logp = torch.log_softmax(self.heads.logits(i, x, lm_head).float(), dim=-1)  # [N_i, V]
            labels = targets.labels[i]
            n = labels.numel()
            ce = F.nll_loss(logp, labels, reduction="sum")
            kl = torch.zeros_like(ce)
            if targets.teacher_logp is not None:
                with torch.set_grad_enabled(torch.is_grad_enabled() and w_t > 0):  # else: only logged
                    t = targets.teacher_logp[targets.teacher_rows[i]]  # [N_i, V]
                    kl = F.kl_div(logp, t, log_target=True, reduction="sum")
            elif targets.teacher_top is not None:
                with torch.set_grad_enabled(torch.is_grad_enabled() and w_t > 0):
                    r = targets.teacher_rows[i]
                    kl = sparse_kl(logp, targets.teacher_top[0][r], targets.teacher_top[1][r])
            if targets.teacher_logp is None and targets.teacher_top is None and w_t > 0:
                raise ValueError(f"the {self.recipe.kind} recipe has a teacher loss but no teacher targets were made")
            loss = ((1.0 - w_t) * ce + w_t * kl) / max(n, 1)
            total = total + self.weights[i] * loss
            with torch.no_grad():
                top5 = logp.topk(min(5, logp.shape[-1]), dim=-1).indices  # [N_i, 5]
                hit = top5 == labels.unsqueeze(-1)  # [N_i, 5]
                stats.append(torch.stack([ce.detach(), kl.detach(), hit[:, 0].sum().float(),
                                          hit.any(-1).sum().float(), ce.new_tensor(float(n))]))
        return total, torch.stack(stats)  # [], [H, 5]

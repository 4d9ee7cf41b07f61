"""Oracle draft heads for exact acceptance tests: drafts known to be right (or wrong) wherever they are asked.

``OracleHeads`` wraps real heads (their parameters, config and Hydra++ prefix layer still run) and overrides
their candidates from each row's true greedy sequence: the rank-0 chain of the tree gets the true tokens up to
a per-row depth ``wrong_after``, every other node a token that is surely wrong. A row then accepts exactly
``min(wrong_after, tree depth)`` drafts every step, so a test can assert each step's accept length.

The drafts are computed on the device from the engine's cache lengths (no host reads), so the oracle runs
eagerly, inside a CUDA graph and under ``torch.compile`` alike. ``bind(oracle)`` hands it those lengths when
an engine is built with it.
"""
from __future__ import annotations

import contextlib
import math

import torch

from hydra_fast import reference
from hydra_fast.engine import SpeculativeEngine


class OracleHeads(torch.nn.Module):
    def __init__(self, real_heads, sequences: list[list[int]] | torch.Tensor, wrong_after=99):
        """sequences: per row, the true token sequence from position 0 (the unpadded prompt, then the greedy
        continuation; give a few tokens more than will be generated). wrong_after: an int or one per row."""
        super().__init__()
        self.real = real_heads
        self.heads = real_heads.heads
        self.prefix_layer = real_heads.prefix_layer
        self.config = real_heads.config
        rows = [list(map(int, s)) for s in sequences]
        k = [wrong_after] * len(rows) if isinstance(wrong_after, int) else list(wrong_after)
        self.register_buffer("seq", _rectangle(rows, max(len(r) for r in rows)), persistent=False)  # [B, T]
        self.register_buffer("wrong_after", torch.tensor(k, dtype=torch.long), persistent=False)  # [B]
        self.lens = None  # the engine's cache lengths int32 [B], set by bind()

    def prepare_draft(self, lm_head) -> None:
        self.real.prepare_draft(lm_head)

    def draft(self, hidden, root, bufs, embed_weight, lm_head, impl) -> torch.Tensor:
        cand = self.real.draft(hidden, root, bufs, embed_weight, lm_head, impl)  # [B, N]
        B, N = cand.shape
        depth = bufs.depth.view(1, N)
        # a node is on the rank-0 chain when every node of its path (root excluded) has rank 0
        path = bufs.node_paths  # [N, L] -1 padded
        rank0 = ((bufs.ranks[path.clamp(min=0)] <= 0) | (path < 0)).all(dim=1).view(1, N)
        idx = (self.lens.to(torch.long).view(B, 1) + depth).clamp(max=self.seq.shape[1] - 1)  # [B, N]
        truth = self.seq[:B].gather(1, idx)
        wrong = (truth + 1 + torch.arange(N, device=cand.device).view(1, N)) % embed_weight.shape[0]
        right = rank0 & (depth <= self.wrong_after[:B].view(B, 1))
        return torch.where(depth == 0, cand, torch.where(right, truth, wrong))

    def reload(self, sequences: list[list[int]]) -> None:
        """New true sequences, copied into the same buffer (a captured graph keeps reading it)."""
        if len(sequences) > self.seq.shape[0] or max(len(r) for r in sequences) > self.seq.shape[1]:
            raise ValueError(f"at most {tuple(self.seq.shape)} tokens fit this oracle; build it with the longest")
        self.seq[: len(sequences)].copy_(_rectangle(sequences, self.seq.shape[1]))

    def expected_accept_lengths(self, max_new_tokens: int, tree_depth: int) -> list[list[int]]:
        """Tokens emitted per step for each row: the prefill gives the first token, each step k + 1."""
        out = []
        for k in self.wrong_after.tolist():
            per_step = min(k, tree_depth) + 1
            out.append([per_step] * math.ceil((max_new_tokens - 1) / per_step))
        return out


def _rectangle(rows: list[list[int]], width: int) -> torch.Tensor:
    """Rows of tokens -> int64 [B, width], each row continued with its last token."""
    return torch.tensor([list(r) + [r[-1]] * (width - len(r)) for r in rows], dtype=torch.long)


@contextlib.contextmanager
def bind(oracle: OracleHeads):
    """While active, an engine built with ``oracle`` as its heads hands the oracle its cache lengths."""
    original = SpeculativeEngine.__init__

    def init(engine, *args, **kwargs):
        original(engine, *args, **kwargs)
        if engine.heads is oracle:
            oracle.lens = engine.cache.lens

    SpeculativeEngine.__init__ = init
    try:
        yield oracle
    finally:
        SpeculativeEngine.__init__ = original


def true_sequences(base, prompts: list[torch.Tensor], max_new_tokens: int, extra: int = 6) -> list[list[int]]:
    """HF greedy, batch 1 per prompt ([1, T] each, unpadded): prompt + max_new_tokens + extra tokens."""
    rows = []
    for ids in prompts:
        out = base.generate(ids, max_new_tokens=max_new_tokens + extra, do_sample=False, eos_token_id=None,
                            pad_token_id=0, attention_mask=torch.ones_like(ids))
        rows.append(out[0].tolist())
    return rows


def padded_batch(prompts: list[torch.Tensor], side: str, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts [1, T_b] -> ids, attention_mask [B, T_max], padded on ``side`` ("left" or "right")."""
    T = max(p.shape[1] for p in prompts)
    ids = torch.full((len(prompts), T), pad, dtype=torch.long, device=prompts[0].device)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        n = p.shape[1]
        cols = slice(T - n, T) if side == "left" else slice(0, n)
        ids[b, cols], mask[b, cols] = p[0], 1
    return ids, mask


class _RecordingHead(torch.nn.Module):
    """A real head that remembers the path tokens of its last call (the dynamic oracle reads them)."""

    def __init__(self, head):
        super().__init__()
        self.head = head
        self.path_len = head.path_len
        self.lm_head = head.lm_head
        self.last_path = None

    def forward(self, hidden, path_tokens, embed_weight, impl):
        self.last_path = path_tokens
        return self.head(hidden, path_tokens, embed_weight, impl)


class DynamicOracleHeads(OracleHeads):
    """The oracle for dynamic trees: wherever a head is asked to continue the true sequence (its path tokens
    are the true ones; Medusa heads see no path and are asked at every frontier node), its top draft is the true
    next token with log-probability ~0, and its other k - 1 drafts are surely wrong with log-probability <= -1;
    past ``wrong_after`` drafts, or off the true path, all k drafts are wrong. The real heads still run (their
    outputs are replaced), so the dynamic tree's expansion, selection and layout are what is tested: a row accepts
    exactly ``min(wrong_after, depth)`` drafts every step only if the tree keeps the true chain."""

    def __init__(self, real_heads, sequences, wrong_after=99):
        super().__init__(real_heads, sequences, wrong_after)
        self.heads = torch.nn.ModuleList(_RecordingHead(h) for h in real_heads.heads)

    def draft_scores(self, i, x, base_lm_head, k, impl=reference):
        logp, _ = self.real.draft_scores(i, x, base_lm_head, k, impl)
        R, depth = x.shape[0], i + 1
        B = self.lens.shape[0]
        b = torch.arange(R, device=x.device) // (R // B)  # row -> sequence (frontier rows are contiguous)
        lens = self.lens.to(torch.long)[b]
        seq = self.seq[:B][b]  # [R, T]
        T = seq.shape[1]
        truth = seq.gather(1, (lens + depth).clamp(max=T - 1).view(R, 1)).view(R)
        path = self.heads[i].last_path
        on_path = torch.ones(R, dtype=torch.bool, device=x.device)
        if self.heads[i].path_len > 0:
            n = path.shape[1]
            idx = (lens.view(R, 1) + torch.arange(n, device=x.device).view(1, n)).clamp(max=T - 1)
            on_path = (seq.gather(1, idx) == path).all(dim=1)
        right = on_path & (depth <= self.wrong_after[:B][b])
        j = torch.arange(k, device=x.device).view(1, k)
        ids = (truth.view(R, 1) + j + (~right).long().view(R, 1)) % self.real.config.vocab_size
        scores = -(j + (~right).long().view(R, 1)).to(logp.dtype)
        return scores, ids

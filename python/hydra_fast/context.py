"""Context drafts: continuations found in the text itself (prompt lookup, suffix matching), on the device.

Generated text often repeats its prompt or itself (code edits, quotes, lists, names). Each step the last
tokens of the text, the next root included, are looked up in the text before them; the tokens that followed
the best earlier occurrence fill the tree's context chain (``Tree.context_len`` nodes off the root) and are
verified in the same forward pass as the heads' nodes. Verification decides what is kept, so a bad guess costs
nothing but its place in the tree and greedy output stays exact.

The text lives in a token history [B, W] kept beside the KV cache: position p holds the token whose K/V sits
at cache position p, and position ``lens[b]`` holds the root (not yet in the cache), so ``lens + 1`` tokens are
valid. Matching is tensor ops with shapes fixed by (B, W, n, M): no host reads, so it runs inside the captured
step. Rules: suffixes of n = max_ngram .. 1 tokens are compared; the longest match wins, the latest occurrence
breaks ties; an occurrence may overlap the suffix (a repeating pattern is continued periodically). Without any
match the chain repeats the root (it will simply be rejected).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MAX_NGRAM = 4  # longest suffix compared; a longer match is a more reliable predictor of what follows


def history_width(capacity: int, max_depth: int) -> int:
    """Width of the token history for a cache of ``capacity`` tokens and a tree of ``max_depth``: a commit
    writes up to max_depth + 1 tokens after the root, the last one possibly at cache position capacity."""
    return capacity + max_depth + 2


def match(history: torch.Tensor, valid: torch.Tensor, max_ngram: int = MAX_NGRAM) -> tuple[torch.Tensor, torch.Tensor]:
    """The best earlier occurrence of each row's suffix.

    history int64 [B, W]; valid int [B]: tokens 0 .. valid - 1 are the text (the last one is the root).
    -> (end int64 [B]: position of the occurrence's last token, <= valid - 2; length int64 [B]: tokens
    matched, 0 .. max_ngram, 0 when nothing matches (then end = valid - 2, the latest candidate))."""
    B, W = history.shape
    K = max_ngram
    n = valid.to(torch.long).view(B, 1)  # [B, 1]
    back = torch.arange(K, device=history.device).view(1, K)  # [1, K]: i tokens back from the end
    suffix = history.gather(1, (n - 1 - back).clamp(min=0))  # [B, K]: suffix[b, i] = history[b, n - 1 - i]
    windows = F.pad(history, (K - 1, 0), value=-1).unfold(1, K, 1).flip(-1)  # [B, W, K]: history[b, e - i]
    same = (windows == suffix.view(B, 1, K)) & (back < n).view(B, 1, K)  # [B, W, K]; -1 pads match nothing
    # [B, W] matched tokens ending at each position e: the index of the first mismatch (argmin returns the first
    # minimum; the padded 0 stands for a full match). A cumprod over K computes the same but its scan kernel is
    # slow on CUDA for many short rows.
    length = F.pad(same.to(torch.uint8), (0, 1)).argmin(-1)
    ends = torch.arange(W, device=history.device).view(1, W)  # [1, W]
    key = torch.where(ends <= n - 2, length * W + ends, torch.full_like(length, -1))  # longest, then latest
    end = key.argmax(-1)  # [B]
    return end, length.gather(1, end.view(B, 1)).view(B)


def draft(history: torch.Tensor, valid: torch.Tensor, num_tokens: int, max_ngram: int = MAX_NGRAM) -> torch.Tensor:
    """The context chain: the ``num_tokens`` tokens that followed the best match. -> int64 [B, num_tokens].

    Token j guesses text position valid + j, which the occurrence ending at e predicts as position e + 1 + j.
    Past the known text that position is itself a guess; with the period d = valid - 1 - e it is the token
    d earlier, so the chain reads e + 1 + (j mod d): always inside the known text."""
    B = history.shape[0]
    end, _ = match(history, valid, max_ngram)
    n = valid.to(torch.long)
    period = (n - 1 - end).clamp(min=1).view(B, 1)  # [B, 1]
    j = torch.arange(num_tokens, device=history.device).view(1, num_tokens)
    pos = end.view(B, 1) + 1 + torch.remainder(j, period)  # [B, M]
    pos = torch.minimum(pos, (n - 1).clamp(min=0).view(B, 1))  # no text before the first step: the root
    return history.gather(1, pos)


def write_prompt(history: torch.Tensor, input_ids: torch.Tensor, lengths: torch.Tensor,
                 first: torch.Tensor) -> None:
    """Start the history: right-padded prompts [B, T] of ``lengths`` [B], then the first generated token
    (the root) at position lengths[b]. Entries past it are never read before a commit writes them."""
    B, T = input_ids.shape
    history.zero_()
    history[:, :T].copy_(input_ids)
    history.scatter_(1, lengths.to(device=history.device, dtype=torch.long).view(B, 1), first.view(B, 1))


def advance(history: torch.Tensor, lens: torch.Tensor, tokens: torch.Tensor) -> None:
    """Append a step's emitted tokens [B, L] (accepted drafts then the next root, -1 padded) after the root
    at position ``lens`` (the cache length before the step's commit). Padding is written as token 0 past the
    new root, where nothing reads it before the next commit overwrites it."""
    B, L = tokens.shape
    j = torch.arange(1, L + 1, device=history.device).view(1, L)
    pos = (lens.to(torch.long).view(B, 1) + j).clamp(max=history.shape[1] - 1)  # [B, L]
    history.scatter_(1, pos, tokens.clamp(min=0))

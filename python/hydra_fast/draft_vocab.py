"""A reduced draft vocabulary (FR-Spec, EAGLE-3's d2t): the heads draft from the V' most frequent tokens.

Drafting multiplies every head's output state by an LM head: [R, d] x [d, V]. With a large vocabulary that
product dominates the draft; most of its rows are tokens the base model almost never writes. A draft
vocabulary keeps the V' tokens most frequent in the base's own answers (the self-distillation data), so the
draft's LM-head products read a compact [V', d] matrix and top-k positions map back to real token ids through
a device index tensor. Verification still uses the full LM head, so the output is unchanged; only drafts of
tokens outside the V' can no longer be proposed.

On disk: ``draft_vocab.safetensors`` in the heads folder, ``ids`` int32 [V] (every token id, forced tokens
first, then by answer-token count, most frequent first; ties and unseen tokens by id) and ``counts`` int64 [V]
(each id's count). The heads config's ``draft_vocab_size`` says how many of them the draft uses (0: all).
``hydra-fast-train vocab`` writes it (``count_answer_tokens`` + ``frequency_order``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from hydra_fast.heads_config import HeadsCheckpointError
from hydra_fast.matmul import linear
from hydra_fast.ops import row_topk

DRAFT_VOCAB_NAME = "draft_vocab.safetensors"
FORMAT = "hydra_fast.draft_vocab/1"


@dataclass(frozen=True)
class DraftVocabFile:
    """Every token id in draft order, with its count in the answers it was built from."""

    ids: torch.Tensor  # int64 [V], a permutation of 0..V-1
    counts: torch.Tensor  # int64 [V], counts[j] is the count of ids[j]
    forced: int = 0  # the first ``forced`` ids are forced in (end and chat-template tokens), whatever their count

    def save(self, directory: str | os.PathLike) -> str:
        """Write ``directory/draft_vocab.safetensors`` atomically (a temp file, then a rename)."""
        from safetensors.torch import save_file

        path = os.path.join(os.fspath(directory), DRAFT_VOCAB_NAME)
        tmp = path + ".tmp"
        save_file({"ids": self.ids.to(torch.int32).contiguous(), "counts": self.counts.to(torch.int64).contiguous()},
                  tmp, metadata={"format": FORMAT, "forced": str(self.forced)})
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike, vocab_size: int) -> DraftVocabFile:
        """Read and check the file of a heads folder (HeadsCheckpointError when missing or inconsistent)."""
        from safetensors import safe_open

        path = os.path.join(os.fspath(directory), DRAFT_VOCAB_NAME)
        if not os.path.isfile(path):
            raise HeadsCheckpointError(f"{path}: missing; build it with `hydra-fast-train vocab --data DATA --heads "
                                       f"{os.fspath(directory)}`, or load with draft_vocab=0 (full vocabulary)")
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                ids, counts = f.get_tensor("ids").long(), f.get_tensor("counts").long()
        except Exception as e:  # safetensors raises its own types for garbled files
            raise HeadsCheckpointError(f"{path}: not a readable draft vocabulary ({type(e).__name__}: {e})") from e
        if meta.get("format") != FORMAT:
            raise HeadsCheckpointError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
        if ids.shape != (vocab_size,) or counts.shape != ids.shape or \
                not torch.equal(ids.sort().values, torch.arange(vocab_size)):
            raise HeadsCheckpointError(f"{path}: ids are not an ordering of the heads' {vocab_size} token ids "
                                       f"(shape {tuple(ids.shape)}); rebuild it with `hydra-fast-train vocab`")
        return cls(ids, counts, int(meta.get("forced", 0)))

    def coverage(self, size: int) -> float:
        """Fraction of the counted answer tokens that the first ``size`` ids cover."""
        total = int(self.counts.sum())
        return float(self.counts[:size].sum()) / total if total else 0.0


def count_answer_tokens(samples, vocab_size: int) -> torch.Tensor:
    """How often each token id occurs in the answers of (ids int [L], answer_start) samples, the base's own
    generations of a self-distillation data set: int64 [vocab_size]. Prompt tokens are not counted: the heads
    draft answers."""
    answers = [ids[start:].long() for ids, start in samples]
    tokens = torch.cat(answers) if answers else torch.zeros(0, dtype=torch.long)  # [sum A]
    if tokens.numel() and not 0 <= int(tokens.min()) <= int(tokens.max()) < vocab_size:
        raise ValueError(f"answer token ids span {int(tokens.min())}..{int(tokens.max())}, outside the "
                         f"vocabulary 0..{vocab_size - 1}: the data belongs to another model")
    return torch.bincount(tokens, minlength=vocab_size)


def frequency_order(counts: torch.Tensor, forced: list[int] | tuple[int, ...] = ()) -> DraftVocabFile:
    """Every id: ``forced`` first (in the given order), then by count (most frequent first, ties by id)."""
    V = counts.shape[0]
    forced = list(dict.fromkeys(int(t) for t in forced))
    bad = [t for t in forced if not 0 <= t < V]
    if bad:
        raise ValueError(f"forced token ids {bad} are outside the vocabulary 0..{V - 1}")
    rest = torch.ones(V, dtype=torch.bool)
    rest[forced] = False
    rest_ids = rest.nonzero().view(-1)  # ascending ids: a stable sort keeps ties by id
    rest_ids = rest_ids[torch.sort(counts[rest_ids], descending=True, stable=True).indices]
    ids = torch.cat([torch.tensor(forced, dtype=torch.long), rest_ids])  # [V]
    return DraftVocabFile(ids, counts.long()[ids], len(forced))


def size_for_coverage(file: DraftVocabFile, coverage: float, multiple: int = 64) -> int:
    """The smallest multiple of ``multiple`` (at least the forced ids) whose ids cover ``coverage`` of the
    answer tokens, at most the vocabulary size."""
    V = file.ids.shape[0]
    total = int(file.counts.sum())
    if total == 0:
        return V
    need = int(torch.searchsorted(file.counts.cumsum(0), torch.tensor(coverage * total, dtype=torch.float64)
                                  .ceil().long())) + 1
    size = max(need, file.forced)
    return min(V, -(-size // multiple) * multiple)


def _version(t: torch.Tensor) -> int:
    """In-place updates counted so far (inference tensors keep no count)."""
    return -1 if t.is_inference() else t._version


class DraftVocab(nn.Module):
    """The V' draft ids on the heads' device, and the compact LM heads gathered from the full ones.

    ``ids`` is a non-persistent buffer: it moves with the heads and stays out of their state dict. A compact
    head is gathered once per source weight and kept; it is gathered again (in place, so captured CUDA graphs
    stay valid) when that weight changes (other storage, device or dtype, or an in-place update)."""

    def __init__(self, ids: torch.Tensor):
        super().__init__()
        if ids.dim() != 1 or ids.numel() < 1:
            raise ValueError(f"draft vocabulary ids must be a non-empty 1-D tensor, got shape {tuple(ids.shape)}")
        self.register_buffer("ids", ids.long(), persistent=False)  # [V']
        self._compact: dict[int, tuple[tuple, torch.Tensor, torch.Tensor | None]] = {}

    @property
    def size(self) -> int:
        return self.ids.shape[0]

    @torch.no_grad()
    def prepare(self, slot: int, lm_head: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The compact (weight [V', d], bias [V'] or None) of ``lm_head``, kept under ``slot``."""
        w, b = lm_head.weight, getattr(lm_head, "bias", None)
        if self.ids.device != w.device:
            raise ValueError(f"draft vocabulary ids are on {self.ids.device} but the LM head is on {w.device}: "
                             "move the heads to the base model's device")
        key = (w.data_ptr(), w.device, w.dtype, tuple(w.shape), _version(w),
               None if b is None else (b.data_ptr(), _version(b)))
        kept = self._compact.get(slot)
        if kept is not None and kept[0] == key:
            return kept[1], kept[2]
        if int(self.ids.max()) >= w.shape[0]:
            raise ValueError(f"draft vocabulary id {int(self.ids.max())} >= the LM head's {w.shape[0]} rows")
        in_place = kept is not None and kept[1].shape == (self.size, w.shape[1]) and kept[1].dtype == w.dtype and \
            kept[1].device == w.device and (kept[2] is None) == (b is None) and \
            not (kept[1].is_inference() and not torch.is_inference_mode_enabled())  # made under inference_mode
        if in_place:
            weight, bias = kept[1].copy_(w[self.ids]), None if b is None else kept[2].copy_(b[self.ids])
        else:
            weight, bias = w[self.ids].contiguous(), None if b is None else b[self.ids].contiguous()  # [V', d]
        self._compact[slot] = (key, weight, bias)
        return weight, bias

    def logits(self, slot: int, x: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
        """Compact logits [R, V'] of x [R, d]: column j is token ``self.ids[j]``.

        Under torch.compile the compact head gathered before (``prepare``) is used as it is."""
        if torch.compiler.is_compiling():
            kept = self._compact.get(slot)
            if kept is None:
                raise RuntimeError("the draft vocabulary's compact LM head was not prepared before compiling: "
                                   "call heads.prepare_draft(base_lm_head) first")
            weight, bias = kept[1], kept[2]
        else:
            weight, bias = self.prepare(slot, lm_head)
        return linear(x, weight, bias)

    def topk(self, slot: int, x: torch.Tensor, lm_head: nn.Module, k: int, impl) -> torch.Tensor:
        """Token ids [R, k] of the k largest compact logits of x [R, d] (real ids, not draft positions), picked by
        ``row_topk`` (impl: the ops module, ``ops.implementation``)."""
        positions = row_topk(self.logits(slot, x, lm_head), k, impl)[1]  # [R, k] in 0..V'-1
        return self.ids[positions]

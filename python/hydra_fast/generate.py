"""The host side of generation: prompts in, tokens out, exactly where HF ``generate`` would stop.

The device runs whole speculative steps (``engine.StepRunner``); per step the host reads back one small
tensor (accepted count and tokens), appends tokens one at a time and stops exactly at EOS, a stopping
criterion or ``max_new_tokens`` even when the step accepted tokens past that point.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers.generation.utils import GenerateDecoderOnlyOutput


@dataclass
class HydraGenerateOutput(GenerateDecoderOnlyOutput):
    """HF's decoder-only output plus, per step, the tokens emitted (accepted drafts + 1) and seconds taken.

    ``accept_lengths[b]`` lists sequence b's emitted-token counts per step (the prefill's first token is
    not a step); ``step_times`` is wall-clock seconds per step, the device synchronised by the read-back.
    """

    accept_lengths: list | None = None
    step_times: list | None = None


@dataclass(frozen=True)
class Prompts:
    """Right-padded prompts for prefill: ids [B, T] and true lengths [B]; ``original`` as the user gave it."""

    ids: torch.Tensor
    lengths: torch.Tensor
    original: torch.Tensor


def prepare_prompts(input_ids, attention_mask, vocab_size: int) -> Prompts:
    """Right-padded copies of the prompts. Every real token (attention_mask 1) must be an id in [0, vocab_size):
    checked here, before any kernel, since a bad id in an embedding lookup kills a CUDA context. Padding
    positions may hold anything (a pad id of -1 or -100): they are never embedded."""
    if not torch.is_tensor(input_ids):
        raise TypeError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int32, torch.int64):
        raise ValueError(f"input_ids must be an integer tensor [batch, length], got {tuple(input_ids.shape)} "
                         f"{input_ids.dtype}")
    B, T = input_ids.shape
    if T == 0 or B == 0:
        raise ValueError("input_ids is empty: give at least one prompt token (e.g. the chat template's output)")
    ids = input_ids.to(torch.long).cpu()
    if attention_mask is None:
        mask = torch.ones_like(ids, dtype=torch.bool)
    else:
        if tuple(attention_mask.shape) != (B, T):
            raise ValueError(f"attention_mask must have the shape of input_ids {(B, T)}, got "
                             f"{tuple(attention_mask.shape)}")
        mask = attention_mask.cpu().bool()
    lengths = mask.sum(-1)
    if bool((lengths == 0).any()):
        raise ValueError("a prompt in the batch is empty (its attention_mask is all zeros)")
    bad = mask & ((ids < 0) | (ids >= vocab_size))
    if bool(bad.any()):
        b, t = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"input_ids[{b}, {t}] = {int(ids[b, t])} is not a token id of this model (vocabulary size "
                         f"{vocab_size}: ids are 0 .. {vocab_size - 1}); use the model's own tokenizer, and mark "
                         "padding with attention_mask = 0")
    right = torch.zeros(B, int(lengths.max()), dtype=torch.long)  # id 0 pads: its outputs are never read
    for b in range(B):
        row = ids[b][mask[b]]
        right[b, : row.numel()] = row
    return Prompts(right, lengths, input_ids)


class TokenSink:
    """Collects each sequence's new tokens and decides, token by token, where each one stops."""

    def __init__(self, prompts: Prompts, max_new_tokens: int, eos_token_ids: set[int], stopping_criteria,
                 streamer):
        B = prompts.ids.shape[0]
        self.prompts = prompts
        self.max_new_tokens = max_new_tokens
        self.eos = eos_token_ids
        self.criteria = stopping_criteria
        self.streamer = streamer
        self.tokens: list[list[int]] = [[] for _ in range(B)]
        self.done = [False] * B
        self.accept_lengths: list[list[int]] = [[] for _ in range(B)]

    def _criteria_stop(self, b: int) -> bool:
        if not self.criteria:
            return False
        row = torch.cat([self.prompts.original[b].cpu().long(), torch.tensor(self.tokens[b], dtype=torch.long)])
        return bool(torch.as_tensor(self.criteria(row.unsqueeze(0), None)).reshape(-1)[0])

    def add(self, b: int, new: list[int]) -> None:
        if self.done[b]:
            return
        taken = []
        for tok in new:
            self.tokens[b].append(tok)
            taken.append(tok)
            if (tok in self.eos or len(self.tokens[b]) >= self.max_new_tokens or self._criteria_stop(b)):
                self.done[b] = True
                break
        if self.streamer is not None and taken:
            self.streamer.put(torch.tensor(taken, dtype=torch.long))

    @property
    def all_done(self) -> bool:
        return all(self.done)

    def sequences(self, pad_token_id: int) -> torch.Tensor:
        original = self.prompts.original.cpu().long()
        B = original.shape[0]
        width = max(len(t) for t in self.tokens)
        new = torch.full((B, width), pad_token_id, dtype=torch.long)
        for b, toks in enumerate(self.tokens):
            new[b, : len(toks)] = torch.tensor(toks, dtype=torch.long)
        return torch.cat([original, new], dim=1)


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """First position where two token lists differ (the shorter length if one extends the other); None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def seed_from(generator: torch.Generator | None) -> int:
    """A 63-bit seed for the engine's sampling generator, drawn from ``generator`` (or torch's default one)."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**63 - 1, (1,), generator=generator, device=device))


def run(engine, runner, prompts: Prompts, sink: TokenSink):
    """Prefill then step until every sequence has stopped. Returns per-step wall times (seconds)."""
    if sink.streamer is not None:
        sink.streamer.put(prompts.original.cpu())
    prefill = getattr(runner, "prefill", engine.prefill)  # StepRunner replays a captured prefill
    first = prefill(prompts.ids.to(engine.device), prompts.lengths).cpu().tolist()
    for b, tok in enumerate(first):
        sink.add(b, [tok])
    step_times = []
    while not sink.all_done:
        t0 = time.perf_counter()
        result = runner().cpu()  # [B, 1 + L]: the one read-back per step
        step_times.append(time.perf_counter() - t0)
        for b in range(result.shape[0]):
            if sink.done[b]:
                continue
            a = int(result[b, 0])
            sink.accept_lengths[b].append(a + 1)
            sink.add(b, result[b, 1: a + 2].tolist())
    if sink.streamer is not None:
        sink.streamer.end()
    return step_times

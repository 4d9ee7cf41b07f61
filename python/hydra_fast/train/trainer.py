"""The training loop: a frozen base model, one or more head sets trained on the same base forward.

Each step runs the base once per micro-batch (last hidden states, and the teacher's log-probabilities when a
recipe distils), then every head set computes its loss and backward on those shared tensors, so several kinds
(``--kinds medusa,hydra,hydra++``) train on identical data for the same steps. Under torchrun each rank reads
its slice of every global batch and each head set is wrapped in DDP; rank 0 logs, checkpoints and saves.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from hydra_fast.heads import DraftHeads, fingerprint
from hydra_fast.train import checkpoint as ckpt
from hydra_fast.train import distributed as du
from hydra_fast.train.card import write_card
from hydra_fast.train.config import HeadRecipe, TrainConfig
from hydra_fast.train.dataset import Batch, SelfDistillData, collate
from hydra_fast.train.losses import STATS, HeadsObjective, make_targets
from hydra_fast.train.metrics import MetricsLog


MAX_NONFINITE = 10  # consecutive skipped updates before a head set is dropped


def kind_dirname(kind: str) -> str:
    """Folder name of a head set: hydra++ -> hydra_pp (the layout of hydra_fast.default_heads_path)."""
    return kind.replace("++", "_pp")


def lr_multiplier(progress: float, warmup: float, min_ratio: float) -> float:
    """Linear warm-up over the first ``warmup`` of the schedule, then cosine down to ``min_ratio``."""
    progress = min(max(progress, 0.0), 1.0)
    if warmup > 0 and progress < warmup:
        return progress / warmup
    t = (progress - warmup) / max(1.0 - warmup, 1e-9)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


@dataclass
class HeadSet:
    recipe: HeadRecipe
    objective: HeadsObjective  # the heads and their loss
    model: torch.nn.Module  # objective, or DDP(objective)
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # dropout and input noise
    stats: torch.Tensor  # [H, len(STATS)] sums since the last log, on the device (no per-step host sync)
    loss_sum: torch.Tensor  # [] on the device
    failed: str | None = None
    nonfinite: int = 0  # steps skipped in a row for a non-finite loss or gradient

    @property
    def heads(self) -> DraftHeads:
        return self.objective.heads


class Trainer:
    def __init__(self, base, data: SelfDistillData, config: TrainConfig, out_dir, dist: du.Dist | None = None,
                 command: str | None = None, progress: bool = True):
        self.base = base.eval().requires_grad_(False)
        self.data, self.config, self.out = data, config, Path(out_dir)
        self.dist = dist or du.Dist(0, 1, 0, base.get_output_embeddings().weight.device)
        self.device = self.dist.device
        self.command, self.progress = command, progress
        self.decoder = base.get_decoder()
        self.embed = base.get_input_embeddings().weight  # [V, d]
        lm = base.get_output_embeddings()
        self.lm_head = lambda x: F.linear(x.to(lm.weight.dtype), lm.weight, lm.bias)  # [*, d] -> [*, V]
        self.autocast = self.device.type == "cuda"
        self.train_idx, self.eval_idx = data.split(config.eval_fraction, config.seed, config.eval_max)
        if config.train_samples is not None:  # the same held-out split, fewer training samples
            if config.train_samples > len(self.train_idx):
                raise ValueError(f"train_samples={config.train_samples} but the data has only "
                                 f"{len(self.train_idx)} training samples (after {len(self.eval_idx)} held out)")
            self.train_idx = sorted(random.Random(f"{config.seed}:subset").sample(self.train_idx,
                                                                                  config.train_samples))
        self.num_heads = max(r.num_heads for r in config.recipes)
        self.teacher = any(r.teacher_weight > 0 for r in config.recipes)
        # cached base outputs (selfdistill cache_hidden / cache_top_k): no base forward / no teacher LM head
        self.cached_hidden = config.use_cache and data.has_hidden
        self.cached_top_k = data.top_k if config.use_cache else 0
        self.sets = [self._make_set(r) for r in config.recipes]
        self.step, self.elapsed_before, self.cursor = 0, 0.0, 0
        self._perm_cache: tuple[int, list[int]] | None = None
        self.metrics = MetricsLog(self.out, enabled=self.dist.main)
        self.eval_results: dict[str, list[dict]] = {}
        self._t0 = time.monotonic()

    # ------------------------------------------------------------------------------------------ setup
    def _make_set(self, recipe: HeadRecipe) -> HeadSet:
        heads = DraftHeads.from_base(self.base, recipe.kind, num_heads=recipe.num_heads,
                                     num_layers=recipe.num_layers, own_lm_head=recipe.own_lm_head,
                                     prefix_init=recipe.prefix_init)
        objective = HeadsObjective(heads.to(self.device, torch.float32), recipe)  # fp32 master weights
        model = objective
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = DistributedDataParallel(objective, device_ids=ids, broadcast_buffers=False)
        opt = torch.optim.AdamW(objective.parameters(), lr=recipe.lr, betas=self.config.betas,
                                weight_decay=recipe.decay(self.config))
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self.config.seed * 1009 + self.dist.rank)
        stats = torch.zeros(recipe.num_heads, len(STATS), device=self.device)
        return HeadSet(recipe, objective, model, opt, gen, stats, torch.zeros((), device=self.device))

    def _expect(self) -> dict:
        heads = {r.kind: {"num_heads": s.heads.config.num_heads, "num_layers": s.heads.config.num_layers,
                          "own_lm_head": s.heads.config.own_lm_head} for r, s in zip(self.config.recipes, self.sets)}
        return {"heads": heads, "base": dataclasses.asdict(fingerprint(self.base)), "data": self.data.digest()}

    @property
    def active(self) -> list[HeadSet]:
        return [s for s in self.sets if s.failed is None]

    # ------------------------------------------------------------------------------------------- data
    def _order(self, epoch: int) -> list[int]:
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            g = torch.Generator().manual_seed(self.config.seed * 7919 + epoch)
            perm = torch.randperm(len(self.train_idx), generator=g).tolist()
            self._perm_cache = (epoch, [self.train_idx[i] for i in perm])
        return self._perm_cache[1]

    def rank_batch_indices(self, cursor: int, rank: int) -> list[int]:
        """Sample indices of rank's slice of the global batch that starts at ``cursor`` in the sample stream
        (the concatenation of seeded epoch permutations): ranks take consecutive, disjoint slices."""
        bs, n = self.config.batch_size, len(self.train_idx)
        lo = cursor + rank * bs
        return [self._order(j // n)[j % n] for j in range(lo, lo + bs)]

    def _collate(self, picks: list[int]) -> Batch:
        cached = [self.data.cached[i] for i in picks] if self.config.use_cache else None
        return collate([self.data[i] for i in picks], self.config.max_len, cached).to(self.device)

    def _next_batch(self) -> Batch:
        picks = self.rank_batch_indices(self.cursor, self.dist.rank)
        self.cursor += self.config.batch_size * self.dist.world
        return self._collate(picks)

    @torch.no_grad()
    def _base_forward(self, batch: Batch, teacher: bool):
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
            if batch.hidden is not None:  # cached by the data build
                hidden = batch.hidden
            else:
                hidden = self.decoder(input_ids=batch.input_ids,
                                      attention_mask=batch.attention_mask).last_hidden_state
            if not self.autocast:
                hidden = hidden.float()
            pe = None
            if any(s.heads.prefix_layer is not None for s in self.active):
                B, T = batch.input_ids.shape
                pos = torch.arange(T, device=self.device).view(1, T).expand(B, T)  # [B, T]
                pe = self.decoder.rotary_emb(hidden, pos)
            top = (batch.top_ids, batch.top_logp) if teacher and batch.top_ids is not None else None
            targets = make_targets(batch.input_ids, batch.answer_mask, self.num_heads,
                                   hidden if teacher and top is None else None, self.lm_head, top)
        return hidden, pe, targets

    def _run_set(self, s: HeadSet, batch, hidden, pe, targets, train: bool, sync: bool = True):
        ctx = s.model.no_sync() if (train and not sync and self.dist.enabled) else contextlib.nullcontext()
        module = s.model if train else s.objective
        with ctx, torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
            loss, stats = module(hidden, batch.input_ids, batch.attention_mask, pe, targets, self.embed,
                                 self.lm_head, s.generator)
            if train:
                (loss / self.config.grad_accum).backward()
        return loss.detach(), stats.detach()

    # ------------------------------------------------------------------------------------------- loop
    def _train_step(self, lr_mult: float) -> None:
        accum = self.config.grad_accum
        for micro in range(accum):
            batch = self._next_batch()
            hidden, pe, targets = self._base_forward(batch, self.teacher)
            for s in self.active:
                try:
                    loss, stats = self._run_set(s, batch, hidden, pe, targets, train=True, sync=micro == accum - 1)
                except Exception:  # one failing kind (e.g. out of memory) must not take the others down
                    if self.dist.enabled:
                        raise
                    self._fail(s, traceback.format_exc())
                    continue
                s.stats += stats
                s.loss_sum += loss / accum
        for s in self.active:
            grads = [p.grad for p in s.objective.parameters() if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) \
                if grads else torch.zeros((), device=self.device)
            if du.any_true(not bool(torch.isfinite(norm)), self.dist, self.device):
                self._skip_nonfinite(s)
                continue
            s.nonfinite = 0
            if self.config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(s.objective.parameters(), self.config.grad_clip)
            for group in s.optimizer.param_groups:
                group["lr"] = s.recipe.lr * lr_mult
            s.optimizer.step()
            s.optimizer.zero_grad(set_to_none=True)

    def _skip_nonfinite(self, s: HeadSet) -> None:
        """A non-finite loss or gradient: skip the update (the heads keep their finite weights); after
        MAX_NONFINITE such steps in a row the set is dropped, never saved with NaN weights."""
        s.optimizer.zero_grad(set_to_none=True)
        s.nonfinite += 1
        print(f"hydra_fast.train: {s.recipe.kind}: non-finite loss or gradient at step {self.step}, update skipped "
              f"({s.nonfinite} in a row)", file=sys.stderr)
        if s.nonfinite >= MAX_NONFINITE:
            self._fail(s, f"{s.recipe.kind}: non-finite loss or gradients for {MAX_NONFINITE} steps in a row; "
                          "lower --lr or check the data")

    def _fail(self, s: HeadSet, message: str) -> None:
        s.failed = message.strip().splitlines()[-1]
        s.optimizer.zero_grad(set_to_none=True)
        print(f"hydra_fast.train: {s.recipe.kind} failed at step {self.step} and is dropped; the other kinds go "
              f"on:\n{message}", file=sys.stderr)

    def _log(self, lr_mult: float, elapsed: float, steps_since: int) -> dict[str, str]:
        postfix = {}
        for s in self.sets:
            stats = du.all_reduce_sum(s.stats.clone(), self.dist).cpu()
            loss = du.all_reduce_sum(s.loss_sum.clone().view(1), self.dist).item()
            loss /= max(steps_since, 1) * self.dist.world
            s.stats.zero_()
            s.loss_sum.zero_()
            if s.failed is None:
                heads = self.metrics.log(self.step, "train", s.recipe.kind, stats, loss, s.recipe.lr * lr_mult,
                                         elapsed)
                postfix[s.recipe.kind] = f"{loss:.3f}/{heads[0]['top1']:.2f}"
        return postfix

    @torch.no_grad()
    def evaluate(self) -> dict[str, list[dict]]:
        """Per-head top-1/top-5 and CE of every head set on the held-out split (summed over ranks)."""
        mine = self.eval_idx[self.dist.rank:: self.dist.world]
        totals = {s.recipe.kind: torch.zeros(s.recipe.num_heads, len(STATS)) for s in self.active}
        for s in self.active:
            s.objective.eval()
        for lo in range(0, len(mine), self.config.batch_size):
            batch = self._collate(mine[lo: lo + self.config.batch_size])
            hidden, pe, targets = self._base_forward(batch, self.teacher)
            for s in self.active:
                _, stats = self._run_set(s, batch, hidden, pe, targets, train=False)
                totals[s.recipe.kind] += stats.cpu()[: s.recipe.num_heads]
        out = {}
        for s in self.active:
            s.objective.train()
            stats = du.all_reduce_sum(totals[s.recipe.kind].to(self.device, copy=True), self.dist).cpu()
            out[s.recipe.kind] = self.metrics.log(self.step, "eval", s.recipe.kind, stats,
                                                  elapsed=self.elapsed())
        return out

    def elapsed(self) -> float:
        return self.elapsed_before + (time.monotonic() - self._t0)

    def fit(self, resume: bool = True, until: int | None = None) -> dict:
        """Train to config.steps (or the time budget), then evaluate and save every head set.

        resume: continue from the checkpoint in out_dir/checkpoint if there is one. until: stop (with a
        checkpoint, without the final save) once this many steps are done, as a preemption would."""
        cfg = self.config
        self._t0 = time.monotonic()
        if resume and ckpt.exists(self.out / "checkpoint"):
            self._restore(ckpt.load(self.out / "checkpoint", self._expect(), map_location=self.device))
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=self.step, unit="step", desc="train heads",
                   disable=not (self.progress and self.dist.main))
        for s in self.sets:
            s.objective.train()
        last_log = self.step
        stop_at = cfg.steps if until is None else min(cfg.steps, until)
        out_of_time = False
        while self.step < stop_at and self.active:
            progress = (self.step + 1) / cfg.steps
            if cfg.max_seconds:
                progress = max(progress, self.elapsed() / cfg.max_seconds)
            lr_mult = lr_multiplier(progress, cfg.warmup, cfg.min_lr_ratio)
            self._train_step(lr_mult)
            self.step += 1
            bar.update(1)
            out_of_time = du.any_true(bool(cfg.max_seconds) and self.elapsed() >= cfg.max_seconds,
                                      self.dist, self.device)
            last = self.step >= stop_at or out_of_time
            if cfg.log_every and (self.step % cfg.log_every == 0 or last):
                bar.set_postfix(self._log(lr_mult, self.elapsed(), self.step - last_log))
                last_log = self.step
            if cfg.eval_every and self.step % cfg.eval_every == 0 and not last:
                self.evaluate()
            if (cfg.ckpt_every and self.step % cfg.ckpt_every == 0) or last:
                self.save_checkpoint()
            if out_of_time:
                break
        bar.close()
        finished = self.step >= cfg.steps or out_of_time or not self.active
        summary = {"step": self.step, "seconds": round(self.elapsed(), 1), "finished": finished,
                   "failed": {s.recipe.kind: s.failed for s in self.sets if s.failed}}
        if finished:
            self.eval_results = self.evaluate() if self.eval_idx else {}
            summary["saved"] = self.save_heads()
            summary["eval"] = self.eval_results
        self.metrics.close()
        return summary

    # ------------------------------------------------------------------------------------ persistence
    def save_checkpoint(self) -> None:
        gens = {s.recipe.kind: du.gather_objects(s.generator.get_state().cpu(), self.dist) for s in self.sets}
        if self.dist.main:
            state = {"step": self.step, "cursor": self.cursor, "elapsed": self.elapsed(), "world": self.dist.world,
                     "failed": {s.recipe.kind: s.failed for s in self.sets if s.failed},
                     "sets": {s.recipe.kind: {"heads": s.heads.state_dict(), "optimizer": s.optimizer.state_dict(),
                                              "generators": gens[s.recipe.kind]} for s in self.active}}
            meta = {**self._expect(), "step": self.step, "train_config": self.config.to_dict()}
            ckpt.save(self.out / "checkpoint", state, meta)
        du.barrier(self.dist)

    def _restore(self, state: dict) -> None:
        self.step, self.cursor, self.elapsed_before = state["step"], state["cursor"], state["elapsed"]
        for s in self.sets:
            if s.recipe.kind in state["failed"]:
                s.failed = state["failed"][s.recipe.kind]
                continue
            saved = state["sets"][s.recipe.kind]
            s.heads.load_state_dict(saved["heads"])
            s.optimizer.load_state_dict(saved["optimizer"])
            if state["world"] == self.dist.world:  # otherwise the dropout/noise streams start afresh
                s.generator.set_state(saved["generators"][self.dist.rank].to("cpu"))

    def save_heads(self) -> dict[str, str]:
        """Rank 0: every trained set to out_dir/<kind> (save_dtype, shards < 15 MB) with a model card."""
        saved = {}
        if not self.dist.main:
            return saved
        dtype = getattr(torch, self.config.save_dtype)
        for s in self.active:
            target = self.out / kind_dirname(s.recipe.kind)
            bad = [n for n, p in s.heads.named_parameters() if not bool(torch.isfinite(p).all())]
            if bad:
                self._fail(s, f"{s.recipe.kind}: non-finite weights in {bad[:3]}; not saved")
                continue
            try:
                copy = DraftHeads(s.heads.config, self.base.config)
                copy.load_state_dict(s.heads.state_dict())
                copy.to(dtype).save_pretrained(target, max_shard_size="15MB")
                write_card(target, s.recipe, self.config, self.data.manifest, self.eval_results.get(s.recipe.kind),
                           self.step, self.elapsed(), self.command)
                saved[s.recipe.kind] = str(target)
            except Exception:  # keep saving the other sets
                self._fail(s, traceback.format_exc())
        return saved

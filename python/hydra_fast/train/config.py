"""Training configuration: one recipe per head set, named presets, and the loop's settings."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from hydra_fast.heads import KINDS


@dataclass(frozen=True)
class HeadRecipe:
    """What one head set is and how it learns. Several recipes train side by side on one base forward."""

    kind: str  # medusa / hydra / hydra++
    num_heads: int = 4
    num_layers: int | None = None  # None: the kind's default (1; 4 for hydra++)
    own_lm_head: bool = False  # False: the base's frozen LM head (small checkpoints)
    teacher_weight: float = 0.0  # loss = (1 - w) * CE(data token) + w * KL(base distribution || head)
    head_decay: float = 0.8  # head i's loss weight is head_decay ** i
    dropout: float = 0.0  # on the base hidden state the heads read
    noise: float = 0.0  # Gaussian input noise, std relative to each hidden state's RMS
    lr: float = 1e-3
    weight_decay: float | None = None  # None: the TrainConfig's
    # hydra++ prefix layer at step 0: "copy" = the base's last decoder layer (DraftHeads.from_base);
    # "identity" = that copy with its residual branches' output projections zeroed, so it passes the base
    # hidden state through and untrained heads start from the base LM head's predictions like the other kinds
    prefix_init: str = "identity"

    def __post_init__(self):
        if self.prefix_init not in ("copy", "identity"):
            raise ValueError(f"prefix_init must be 'copy' or 'identity', got {self.prefix_init!r}")
        if self.kind not in KINDS:
            raise ValueError(f"unknown heads kind {self.kind!r}; known kinds: {', '.join(KINDS)}")
        if not 0.0 <= self.teacher_weight <= 1.0:
            raise ValueError(f"teacher_weight must be in [0, 1], got {self.teacher_weight}")
        if not 0.0 <= self.dropout < 1.0 or self.noise < 0:
            raise ValueError(f"need 0 <= dropout < 1 and noise >= 0, got {self.dropout}, {self.noise}")

    def decay(self, config: "TrainConfig") -> float:
        return config.weight_decay if self.weight_decay is None else self.weight_decay

    def head_weights(self) -> list[float]:
        return [self.head_decay ** i for i in range(self.num_heads)]


# The paper's recipes: Medusa and Hydra heads learn the data tokens; Hydra++ = 4-layer heads + the prefix
# layer (built in by the kind) + teacher distillation.
RECIPES: dict[str, HeadRecipe] = {
    "medusa": HeadRecipe("medusa"),
    "hydra": HeadRecipe("hydra"),
    "hydra++": HeadRecipe("hydra++", num_layers=4, teacher_weight=1.0),
}


def recipes_for(kinds: list[str], **overrides) -> tuple[HeadRecipe, ...]:
    """The preset recipe of each kind, with the given fields (those not None) replaced in all of them."""
    set_ = {k: v for k, v in overrides.items() if v is not None}
    out = []
    for kind in kinds:
        if kind not in RECIPES:
            raise ValueError(f"unknown heads kind {kind!r}; known kinds: {', '.join(RECIPES)}")
        out.append(dataclasses.replace(RECIPES[kind], **set_))
    if len({r.kind for r in out}) != len(out):
        raise ValueError(f"a kind is listed twice in {kinds}")
    return tuple(out)


@dataclass(frozen=True)
class TrainConfig:
    recipes: tuple[HeadRecipe, ...] = field(default_factory=lambda: (RECIPES["hydra"],))
    steps: int = 1000  # optimizer steps (the schedule's length unless max_seconds ends it first)
    max_seconds: float | None = None  # wall-clock budget: the schedule follows max(step/steps, time/budget)
    batch_size: int = 8  # sequences per micro-batch per rank
    grad_accum: int = 1  # micro-batches per optimizer step
    max_len: int = 1024  # tokens per sequence (longer ones are cut)
    warmup: float = 0.05  # fraction of the schedule spent warming up linearly
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # 0: off
    seed: int = 0
    eval_fraction: float = 0.02  # held-out share of the data (per-head accuracy in the model card)
    eval_max: int = 256  # held-out samples at most
    train_samples: int | None = None  # train on a seeded subset of this many samples (data-size ablations)
    use_cache: bool = True  # use the data set's cached hidden states / teacher top-k when it has them
    eval_every: int = 0  # steps between held-out evaluations (0: only at the end)
    log_every: int = 10
    ckpt_every: int = 200  # steps between checkpoints (0: only at the end)
    save_dtype: str = "bfloat16"  # dtype of the saved heads

    def __post_init__(self):
        if not self.recipes:
            raise ValueError("no head recipes to train")
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1 or self.max_len < 4:
            raise ValueError("need steps, batch_size, grad_accum >= 1 and max_len >= 4")
        if self.train_samples is not None and self.train_samples < 1:
            raise ValueError(f"train_samples must be at least 1 (or None for all), got {self.train_samples}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def kinds(self) -> list[str]:
        return [r.kind for r in self.recipes]

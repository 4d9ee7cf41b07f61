"""What a set of draft heads is and which base model it belongs to: kinds, configuration, fingerprint.

``heads.py`` builds the modules from these; checkpoints record them in config.json, so heads loaded onto
another base model fail with an error that says which property differs.
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field

import torch
from torch import nn

FORMAT = "hydra_fast.heads/1"


class HeadsMismatchError(ValueError):
    """Heads trained for one base model were given another."""


class HeadsCheckpointError(ValueError):
    """A heads checkpoint file is missing, unreadable or inconsistent."""


@dataclass(frozen=True)
class HeadKind:
    path_tokens: bool  # head i reads the i + 1 tokens root..its parent (Hydra) or none (Medusa)
    prefix_layer: bool  # one decoder layer of the base over its hidden states feeds the heads (Hydra++)
    default_layers: int  # MLP blocks per head


KINDS: dict[str, HeadKind] = {
    "medusa": HeadKind(path_tokens=False, prefix_layer=False, default_layers=1),
    "hydra": HeadKind(path_tokens=True, prefix_layer=False, default_layers=1),
    "hydra++": HeadKind(path_tokens=True, prefix_layer=True, default_layers=4),
}


SKETCH_TOLERANCE = 0.02  # bf16 / fp16 rounding moves a sketch entry by ~0.002; another model's by ~1


@dataclass(frozen=True)
class BaseFingerprint:
    """What identifies the base model heads were trained for.

    ``lm_head_sketch``: for ~64 evenly spaced LM-head rows, the row's projection on a fixed +-1 vector over its
    norm. It is dtype-stable (fp32, bf16 and fp16 copies of one model agree within SKETCH_TOLERANCE) and
    compared with that tolerance. ``lm_head_digest`` (sha256 of the rows rounded to bf16) is kept for heads
    saved before the sketch existed; it is compared only when one side has no sketch."""

    architecture: str
    model_type: str
    hidden_size: int
    vocab_size: int
    lm_head_digest: str
    lm_head_sketch: tuple = ()

    def __post_init__(self):
        object.__setattr__(self, "lm_head_sketch", tuple(float(x) for x in self.lm_head_sketch))

    def describe(self) -> str:
        return (f"{self.architecture} ({self.model_type}) hidden {self.hidden_size} vocab {self.vocab_size} "
                f"(lm head digest {self.lm_head_digest[:12]}..)")

    def differences(self, other: BaseFingerprint) -> list[str]:
        """Names of the fields in which ``other`` is another base model."""
        diff = [f for f in ("architecture", "model_type", "hidden_size", "vocab_size")
                if getattr(self, f) != getattr(other, f)]
        a, b = self.lm_head_sketch, other.lm_head_sketch
        if a and b:
            if len(a) != len(b) or any(abs(x - y) > SKETCH_TOLERANCE for x, y in zip(a, b)):
                diff.append("lm_head_sketch")
        elif self.lm_head_digest != other.lm_head_digest:
            diff.append("lm_head_digest")
        return diff


def fingerprint(base_model: nn.Module) -> BaseFingerprint:
    config = base_model.config
    weight = base_model.get_output_embeddings().weight.detach()  # [V, d]
    V, d = weight.shape
    rows = torch.linspace(0, V - 1, steps=min(64, V)).round().long().unique()  # [<=64]
    sample = weight[rows.to(weight.device)].to(torch.float32).cpu()  # [<=64, d]
    digest = hashlib.sha256(repr(tuple(weight.shape)).encode())
    digest.update(sample.to(torch.bfloat16).to(torch.float32).contiguous().numpy().tobytes())
    signs = ((torch.arange(d, dtype=torch.float64) * 0.6180339887498949) % 1.0 < 0.5).double() * 2 - 1  # [d]
    rows64 = sample.double()
    sketch = (rows64 @ signs) / rows64.norm(dim=1).clamp(min=1e-30)  # [<=64]
    return BaseFingerprint(
        architecture=(config.architectures or [type(base_model).__name__])[0],
        model_type=config.model_type,
        hidden_size=int(config.get_text_config().hidden_size),
        vocab_size=int(V),
        lm_head_digest=digest.hexdigest(),
        lm_head_sketch=tuple(round(float(x), 5) for x in sketch),
    )


@dataclass(frozen=True)
class HeadsConfig:
    kind: str  # a key of KINDS
    hidden_size: int
    vocab_size: int
    base: BaseFingerprint
    num_heads: int = 4
    num_layers: int | None = None  # None: the kind's default (1; 4 for hydra++)
    own_lm_head: bool = False  # False: share the base's frozen LM head
    base_config: dict = field(default_factory=dict, hash=False)  # base config.to_dict(): builds the prefix layer
    dtype: str = "float32"
    draft_vocab_size: int = 0  # the draft reads the first N ids of draft_vocab.safetensors (0: the full vocabulary)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown heads kind {self.kind!r}; known kinds: {', '.join(KINDS)}")
        if self.num_layers is None:
            object.__setattr__(self, "num_layers", KINDS[self.kind].default_layers)
        if self.num_heads < 1 or self.num_layers < 1:
            raise ValueError(f"need num_heads >= 1 and num_layers >= 1, got {self.num_heads}, {self.num_layers}")
        if not 0 <= self.draft_vocab_size <= self.vocab_size:
            raise ValueError(f"draft_vocab_size must be in 0..{self.vocab_size} (0: full vocabulary), got "
                             f"{self.draft_vocab_size}")

    def to_dict(self) -> dict:
        return {"format": FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> HeadsConfig:
        d = dict(d)
        if d.pop("format", None) != FORMAT:
            raise ValueError(f"not a hydra_fast heads config (expected \"format\": \"{FORMAT}\"); a base model's "
                             "config.json? pass the heads directory")
        return cls(**{**d, "base": BaseFingerprint(**d["base"])})


def check_compatible(heads: nn.Module, base_model: nn.Module, source: str = "these heads") -> None:
    """Raise HeadsMismatchError, naming the differing fields, unless heads were trained for base_model."""
    want, have = heads.config.base, fingerprint(base_model)
    diff = want.differences(have)
    if diff:
        raise HeadsMismatchError(
            f"{source} were trained for {want.describe()}, but this model is {have.describe()} "
            f"({', '.join(diff)} differ); train heads for this model with DraftHeads.from_base(model, kind) and "
            f"DraftHeads.forward_train, or load heads trained for {have.architecture}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")

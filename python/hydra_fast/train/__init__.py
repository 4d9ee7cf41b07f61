"""Training draft heads: self-distilled data (``build``), objectives (``losses``), the loop (``trainer``).

Command line: ``hydra-fast-train data|fit|default-heads|vocab`` (``python -m hydra_fast.train``).
"""
from hydra_fast.train.selfdistill import BuildConfig, build
from hydra_fast.train.checkpoint import CheckpointError, CheckpointMismatchError
from hydra_fast.train.config import RECIPES, HeadRecipe, TrainConfig, recipes_for
from hydra_fast.train.dataset import DataError, DataMismatchError, SelfDistillData
from hydra_fast.train.sources import EvalLeakError, SourceSpec
from hydra_fast.train.trainer import Trainer

__all__ = ["BuildConfig", "build", "CheckpointError", "CheckpointMismatchError", "RECIPES", "HeadRecipe",
           "TrainConfig", "recipes_for", "DataError", "DataMismatchError", "SelfDistillData", "EvalLeakError",
           "SourceSpec", "Trainer"]

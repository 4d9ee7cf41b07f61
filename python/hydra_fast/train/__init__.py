"""Training draft heads: self-distilled data (``selfdistill``, ``dataset``, ``sources``)."""
from hydra_fast.train.dataset import DataError, DataMismatchError, SelfDistillData
from hydra_fast.train.selfdistill import BuildConfig, build
from hydra_fast.train.sources import EvalLeakError, SourceSpec

__all__ = ["BuildConfig", "build", "DataError", "DataMismatchError", "SelfDistillData", "EvalLeakError",
           "SourceSpec"]

"""hydra_fast: Hydra draft heads for fast batch-1 generation with Hugging Face causal LMs."""
from hydra_fast.ops import build_info

__all__ = ["build_info"]
__version__ = "0.1.0"

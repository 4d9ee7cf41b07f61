"""hydra_fast: Hydra draft heads for fast batch-1 generation with Hugging Face causal LMs."""
from hydra_fast.defaults import default_heads_path
from hydra_fast.ops import build_info

__all__ = ["HydraModel", "build_info", "default_heads_path"]
__version__ = "0.1.0"


def __getattr__(name):
    # HydraModel pulls in transformers; import it on first use so `import hydra_fast` stays light.
    if name == "HydraModel":
        from hydra_fast.model import HydraModel

        return HydraModel
    raise AttributeError(f"module 'hydra_fast' has no attribute {name!r}")

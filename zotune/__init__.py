"""zotune: zeroth-order fine-tuning of language models in about the memory of inference.

The trainer classes are imported on first use, so `zotune validate` and `zotune ls` stay
fast and never import torch; type checkers and IDEs see them through the TYPE_CHECKING block.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from zotune.optim import ZOOptimizer
    from zotune.trainer import ZOConfig, ZOTrainer

try:
    __version__ = version("zotune")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["ZOConfig", "ZOOptimizer", "ZOTrainer", "__version__"]


def __getattr__(name: str):
    if name in ("ZOConfig", "ZOTrainer"):
        from zotune import trainer

        return getattr(trainer, name)
    if name == "ZOOptimizer":
        from zotune.optim import ZOOptimizer

        return ZOOptimizer
    raise AttributeError(f"module 'zotune' has no attribute {name!r}")

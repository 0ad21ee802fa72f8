"""zotune: zeroth-order fine-tuning of language models in about the memory of inference.

The trainer classes are imported on first use, so `zotune validate` and `zotune ls` stay
fast and never import torch.
"""

__all__ = ["ZOConfig", "ZOTrainer", "ZOOptimizer"]


def __getattr__(name: str):
    if name in ("ZOConfig", "ZOTrainer"):
        from zotune import trainer

        return getattr(trainer, name)
    if name == "ZOOptimizer":
        from zotune.optim import ZOOptimizer

        return ZOOptimizer
    raise AttributeError(f"module 'zotune' has no attribute {name!r}")

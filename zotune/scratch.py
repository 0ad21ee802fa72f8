"""How a module runs at θ + c·z without moving θ, and the scratch memory that takes.

The out-of-place dual schedule (`zotune.dual`) runs each module that owns trainable parameters
on perturbed copies of those parameters, made for its call and freed after it. The copy is
generic per module type, never per architecture:

- ``rows``: an `nn.Embedding` (no ``max_norm``) gets only the rows its input looks up; the
  counter-based noise gives any row's z at its own offset.
- ``chunks``: an `nn.Linear` (its own forward) whose weight has more than `CHUNK_ELEMENTS`
  elements is applied in chunks of output rows, one chunk's perturbed weight at a time: a
  tied LM head over a large vocabulary never has a whole perturbed copy.
- ``whole``: every other module gets a perturbed copy of each of its own trainable parameters.

`scratch_bytes` is the peak extra memory of one call under that strategy; the planner
(`zotune.plan`) and the dual engine's tracker use it, and a test checks the measured peak of
every architecture against the largest module's own parameter bytes.
"""

from __future__ import annotations

from torch import nn
from transformers.pytorch_utils import Conv1D

# A chunked Linear's perturbed weight never exceeds this many elements (16 MB in fp32); a smaller
# Linear is copied whole. GPT-2's largest block matrix has 2.4M elements, Llama-3-8B's 58.7M.
CHUNK_ELEMENTS = 1 << 22


def strategy(module: nn.Module) -> str:
    """How `module` gets its perturbed parameters: "rows", "chunks" or "whole" (see the module doc)."""
    if isinstance(module, nn.Embedding) and module.max_norm is None:
        return "rows"
    if type(module).forward is nn.Linear.forward and module.weight.numel() > CHUNK_ELEMENTS:
        return "chunks"
    return "whole"


def linear_form(module: nn.Module) -> str | None:
    """"linear" for a module that runs `nn.Linear`'s forward (y = x Wᵀ + b), "conv1d" for transformers'
    `Conv1D` (y = x W + b), else None. The dual engine computes these products itself, writing each
    half of the batch straight into the joined output."""
    if type(module).forward is nn.Linear.forward:
        return "linear"
    if type(module).forward is Conv1D.forward:
        return "conv1d"
    return None


def chunk_rows(weight) -> int:
    """Output rows of one chunk of a chunked Linear's weight."""
    return max(1, CHUNK_ELEMENTS // max(1, weight[0].numel()))


def scratch_bytes(module: nn.Module, trainable: list, rows_looked_up: int) -> int:
    """Peak bytes of perturbed copies while `module` runs once, `trainable` being its own trainable
    parameters, `rows_looked_up` the distinct rows an Embedding's input selects."""
    kind = strategy(module)
    if kind == "rows" and any(p is module.weight for p in trainable):
        weight = module.weight
        rest = sum(p.numel() * p.element_size() for p in trainable if p is not weight)
        return min(rows_looked_up, weight.shape[0]) * weight[0].numel() * weight.element_size() + rest
    if kind == "chunks":
        # the weight's chunk and the bias's matching slice
        rows = min(chunk_rows(module.weight), module.weight.shape[0])
        return sum(rows * p[0].numel() * p.element_size() if p.dim() else p.element_size() for p in trainable)
    return sum(p.numel() * p.element_size() for p in trainable)

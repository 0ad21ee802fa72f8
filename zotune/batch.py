"""The rows of a batch: a dict of model inputs whose per-row tensors share their first dimension.

A batch may also hold tensors that are not per row (a 0-d scalar, a preference batch's per-pair
columns) and values that are not tensors; those go whole to every part a batch is cut into.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch


def batch_rows(inputs: Mapping) -> int:
    """The batch's rows: the first dimension of its first tensor that has one (0 if none has)."""
    return next((len(v) for v in inputs.values() if torch.is_tensor(v) and v.dim()), 0)


def is_per_row(value, rows: int) -> bool:
    """Whether `value` is a tensor with one entry per row of a batch of `rows` rows."""
    return torch.is_tensor(value) and value.dim() > 0 and len(value) == rows


def take_rows(inputs: Mapping, take: Callable[[torch.Tensor], torch.Tensor], rows: int | None = None) -> dict:
    """The batch with `take` applied to each of its per-row tensors (of `rows` rows, by default the
    batch's own), the rest as it is."""
    rows = batch_rows(inputs) if rows is None else rows
    return {k: take(v) if is_per_row(v, rows) else v for k, v in inputs.items()}


def first_rows(inputs: Mapping, n: int) -> dict:
    """The first `n` rows of a batch whose tensors all have the same rows; any other batch whole
    (a preference batch with per-pair columns, say)."""
    if len({len(v) for v in inputs.values() if torch.is_tensor(v) and v.dim()}) != 1:
        return dict(inputs)
    return take_rows(inputs, lambda v: v[:n])

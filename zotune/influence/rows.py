"""Per-example values of a batch's loss, and the dataset index of every row.

A ZO step's projected gradient is a weighted mean of per-example projections: with ℓ_r the loss
of row r and w_r what the batch loss averages it with (its label tokens for a token-level loss,
else 1),

    L = Σ_r w_r ℓ_r / Σ_r w_r,   so   g = (L(θ+a·z) − L(θ+b·z)) / (a − b) = Σ_r (w_r / W) g(x_r).

`row_values` takes the ℓ_r from the outputs of a forward the step runs anyway (each row's slice
of them, reduced by the same loss function), so the record of a step can keep every g(x_r) for
B floats (`zotune.influence.trace` attributes a loss change to them).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from zotune.data.collate import IGNORED_LABEL
from zotune.dual import rows_of


def row_items(labels: torch.Tensor | None, rows: int) -> list[int]:
    """What the batch loss averages each row with: its label tokens (shifted, as a causal LM counts
    them) for token-level labels, else 1."""
    if labels is None or labels.dim() < 2:
        return [1] * rows
    return (labels[..., 1:] != IGNORED_LABEL).sum(dim=-1).tolist()


def row_values(outputs, labels: torch.Tensor, rows: int, loss_of: Callable) -> list[float]:
    """ℓ_r for each row: `loss_of(outputs, labels)` on the row's slice of both."""
    return [float(loss_of(rows_of(outputs, r, rows, rows), labels[r:r + 1])) for r in range(rows)]


def attributable(zo, objective) -> bool:
    """Whether the steps of `zo` can keep each row's projection: a ZO-SGD step on the loss (no
    `objective`), whose g is the rows' weighted mean; not with an estimator that takes L(θ) too,
    with directions on row slices, or with cge (one direction per trained element: d×B numbers a step)."""
    return (zo.rule.name == "sgd" and not zo.estimator.loss_at_theta and objective is None
            and not zo.slice_directions and zo.estimator.name != "cge")


class RowRecorder:
    """Collects one step's per-example projections for its trajectory record.

    The trainer hands it the ℓ_r of every value it measures (`seen`), in the order the step takes
    them (for each direction, the loss at its first point, then at its second), and closes each
    micro-batch with its rows' indices and weights (`micro_batch`). `fields()` gives the record's
    `row_index`, `row_weight` (w_r / W over the step's rows on all ranks) and `row_g` (per direction,
    g_k(x_r)), so that the step's g_k = Σ_r row_weight[r] · row_g[k][r]; nothing for a step of which
    some micro-batch had no labels."""

    def __init__(self, offsets: tuple[float, float], q: int):
        self.offsets, self.q = offsets, q
        self._values: list[list[float]] = []
        self._reset()

    def _reset(self) -> None:
        self.complete = True  # every value of the step came with its rows' values
        self.index: list[int | None] = []
        self.items: list[int] = []
        self.g: list[list[float]] = [[] for _ in range(self.q)]

    def seen(self, values: list[float]) -> None:
        self._values.append(values)

    def discard(self) -> None:
        """Forget values measured outside a step's estimate (the dual schedule's check on the first batch)."""
        self._values = []

    def micro_batch(self, index: torch.Tensor | None, items: list[int]) -> None:
        a, b = self.offsets
        values, self._values = self._values, []
        if len(values) != 2 * self.q:  # a batch without labels: its rows' losses are not the model's
            self.complete = False
            return
        self.index += index.tolist() if index is not None else [None] * len(items)
        self.items += items
        for k in range(self.q):
            self.g[k] += [(la - lb) / (a - b) for la, lb in zip(values[2 * k], values[2 * k + 1])]

    def fields(self) -> dict:
        from zotune.optim import data_parallel

        index, items, g, complete = self.index, self.items, self.g, self.complete
        self._reset()
        if data_parallel():  # every rank's rows, in rank order, on every rank
            import torch.distributed as dist

            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (index, items, g, complete))
            index = [i for part in gathered for i in part[0]]
            items = [n for part in gathered for n in part[1]]
            g = [[v for part in gathered for v in part[2][k]] for k in range(self.q)]
            complete = all(part[3] for part in gathered)
        if not complete:
            return {}
        total = sum(items)
        return {"row_index": index, "row_weight": [n / total if total else 0.0 for n in items], "row_g": g}

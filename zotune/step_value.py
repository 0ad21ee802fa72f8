"""The value a ZO step measures for a batch at the current weights.

`compute_loss`'s loss (however a Trainer subclass reduces it), or `zo_objective` of the model's
outputs. With a `RowRecorder` (a step whose projections split into rows: `zotune.influence.rows`),
the same forward also gives each row's own loss. The first batch checks that those average to the
batch's loss; if they do not (a penalty, label smoothing, packed rows), the run keeps no
per-example projections rather than wrong ones, and says so once.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from transformers.utils import logging

from zotune.batch import batch_rows
from zotune.influence.rows import RowRecorder, row_items, row_values
from zotune.objectives import Objective

logger = logging.get_logger("zotune")


class StepValue:
    """`value(model, inputs)`: the float the step's estimate is built from.

    `compute_loss(model, inputs, return_outputs=False)` is the trainer's; `row_loss(model)` gives
    the loss of one row's outputs and labels, reduced as `compute_loss` reduces a batch's; `owner`
    names the trainer's class in what is said."""

    def __init__(self, compute_loss: Callable, objective: Objective | None, rows: RowRecorder | None,
                 row_loss: Callable, owner: str):
        self.compute_loss, self.objective, self.row_loss = compute_loss, objective, row_loss
        self.owner = owner  # the trainer's class, for the one line said
        self.rows = rows  # None once the first batch showed the loss does not split into its rows
        self._rows_checked = False

    def __call__(self, model, inputs: dict) -> float:
        if self.objective is not None:
            inputs = dict(inputs)
            labels = inputs.pop("labels", None)
            return self.objective(model(**inputs), labels)
        labels = inputs.get("labels")
        if self.rows is not None and labels is not None:
            value = self._with_rows(model, inputs, labels)
            if value is not None:
                return value
        return self.compute_loss(model, dict(inputs)).item()  # a copy: compute_loss pops "labels"

    def items(self, inputs: dict) -> int:
        """What the value of `inputs` is a mean over: its label tokens for the loss (shifted, as a
        causal LM's loss counts them), else its rows. Micro-batches and data-parallel shards are
        weighted by it."""
        rows = batch_rows(inputs)
        if self.objective is not None:
            return rows
        return sum(row_items(inputs.get("labels"), rows))

    def _with_rows(self, model, inputs: dict, labels) -> float | None:
        """The batch's loss, its rows' own losses handed to the recorder (None: they could not be)."""
        checking, self._rows_checked = not self._rows_checked, True
        try:  # a compute_loss override may not give outputs; a model may have no per-row loss
            loss, outputs = self.compute_loss(model, dict(inputs), return_outputs=True)
            values = row_values(outputs, labels, len(labels), self.row_loss(model))
        except Exception as e:  # noqa: BLE001 - a real error in compute_loss raises again in the plain call
            if not checking:
                raise
            return self._without_rows(f"its rows' losses could not be taken ({type(e).__name__}: {e})")
        if checking:
            items = row_items(labels, len(labels))
            mean = sum(v * n for v, n in zip(values, items)) / max(1, sum(items))
            if not math.isclose(mean, loss.item(), rel_tol=1e-4, abs_tol=1e-5):
                return self._without_rows(f"the rows' own losses average to {mean:.6g}, not the batch's "
                                          f"{loss.item():.6g}")
        self.rows.seen(values)
        return loss.item()

    def _without_rows(self, reason: str) -> None:
        logger.info("zotune: %s: %s, so the steps keep no per-example projections (zotune influence)",
                    self.owner, reason)
        self.rows = None

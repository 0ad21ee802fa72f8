"""The losses of one ZO step: the (L+, L−) pairs `ZOOptimizer.estimate` asks a micro-batch for.

In place (fused, sequential) the optimizer moves the weights themselves and asks for the plain
value (`StepValue`, below). Out of place (`dual`) a `DualEngine` hands every wrapped
module perturbed copies of its weights, and a pair comes from
- one doubled forward, each half at one sign (`zotune.dual.call_halves`), when the model splits its
  input along the batch;
- else two forwards through the same wrappers, one per sign;
- with `slice_directions`, all directions from one doubled forward, each on its own slice of the
  batch's rows (`zotune.dual.call_slices`).

Which of these runs is decided once, by `check_dual` on the first batch, before the step writes
anything: the trajectory header records the schedule it settles.

The value a step measures for a batch at the current weights (`StepValue`) is `compute_loss`'s
loss (however a Trainer subclass reduces it), or `zo_objective` of the model's outputs. With a
`RowRecorder` (a step whose projections split into rows: `zotune.influence.rows`), the same
forward also gives each row's own loss. The first batch checks that those average to the
batch's loss; if they do not (a penalty, label smoothing, packed rows), the run keeps no
per-example projections rather than wrong ones, and says so once.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from transformers.utils import logging

from zotune.batch import batch_rows, first_rows, take_rows
from zotune.dual import DualEngine, DualRefused, OutsideReads, call_halves, call_slices, losses_agree
from zotune.influence.rows import RowRecorder, row_items, row_values
from zotune.objectives import Objective
from zotune.optim import ZOOptimizer

logger = logging.get_logger("zotune")
# check_dual runs this many rows of the first batch: it costs a doubled forward of them once,
# and 2 rows still tell a split along the batch from a broadcast
CHECK_ROWS = 2


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


class StepLosses:
    """The pairs of one micro-batch (`loss_fn`), from `value` at the weights `zo` sets. `owner`
    names the trainer's class in what is said."""

    def __init__(self, model: torch.nn.Module, zo: ZOOptimizer, value: StepValue, owner: str):
        self.zo, self.value, self.owner = zo, value, owner
        self.dual = DualEngine(model, zo) if zo.out_of_place else None
        self.one_forward = True  # both signs in one doubled forward (else a forward each)
        self.checked = self.dual is None  # whether the schedule is settled

    def loss_fn(self, model, inputs: dict) -> Callable:
        """What `ZOOptimizer.estimate` calls: () -> L in place; (seed, k) -> (L+, L−) out of place,
        or (seed, (k_1, ..., k_m)) -> a pair per direction with `slice_directions`."""
        if self.dual is None:
            return lambda: self.value(model, inputs)

        def losses(seed: int, k):
            if isinstance(k, tuple):
                return self._slice_pairs(model, inputs, seed, k)
            return self._pair(model, inputs, (seed, k))
        return losses

    def _pair(self, model, inputs: dict, direction) -> tuple[float, float]:
        if self.one_forward:
            return call_halves(self.dual, model, direction, lambda: self.value(model, inputs))
        values = []
        for half in (0, 1):
            with self.dual.dual_forward(0, direction, half=half):
                values.append(self.value(model, inputs))
        return values[0], values[1]

    def _slice_pairs(self, model, inputs: dict, seed: int, ks: tuple[int, ...]) -> list[tuple[float, float]]:
        """Each direction k_i's pair on the i-th of len(ks) slices of the batch's rows: from one dual
        forward when the slices are equal; else (a last, short batch; a model that cannot be split)
        direction by direction, each on its slice. A batch of fewer rows than directions gives each
        row to every len(rows)-th direction."""
        rows = batch_rows(inputs)
        parts = min(rows, len(ks))
        slices = [take_rows(inputs, lambda v, i=i: v.tensor_split(parts)[i % parts], rows) for i in range(len(ks))]
        if self.one_forward and rows % len(ks) == 0:
            return call_slices(self.dual, model, seed, ks, lambda i: self.value(model, slices[i]))
        return [self._pair(model, part, (seed, k)) for part, k in zip(slices, ks)]

    @torch.no_grad()
    def check_dual(self, model, inputs: dict) -> None:
        """Before the first step: run the first `CHECK_ROWS` rows of the batch doubled, unperturbed.

        - Every module must split its input along the batch, and each half's value must equal the
          plain one; if not, the two signs run as two forwards through the same wrappers.
        - Nothing may read a trainable weight's values outside the module that owns it (a penalty on
          θ in an overridden `compute_loss`): there it holds θ, not the perturbed copy. If something
          does, the step runs in place (fused), where the weights themselves move.
        Either is said in one line."""
        self.checked = True
        inputs = first_rows(inputs, CHECK_ROWS)
        plain = self.value(model, inputs)
        reads = OutsideReads(self.dual)
        try:
            with reads:
                halves = call_halves(self.dual, model, None, lambda: self.value(model, inputs))
            if not all(losses_agree(h, plain) for h in halves):
                raise DualRefused(f"the halves' values {halves} differ from the plain value {plain}")
        except Exception as e:  # noqa: BLE001 - any failure of the doubled forward: two forwards
            reason = e if isinstance(e, DualRefused) else f"the doubled forward failed: {type(e).__name__}: {e}"
            logger.warning("zotune: %s cannot run both signs in one doubled forward (%s); running them as two "
                           "forwards", type(model).__name__, reason)
            self.one_forward = False
        if self.value.rows is not None:
            self.value.rows.discard()  # the check's values belong to no step
        if reads.found:
            names = sorted(reads.found)
            # a first-order rule takes its gradient at θ between micro-batches, where fused leaves it displaced
            schedule = "sequential" if self.zo.rule.first_order else "fused"
            logger.warning("zotune: %s reads %s outside the module that owns it, where the out-of-place dual "
                           "schedule leaves θ; training in place with the %s schedule (the numbers of sequential)",
                           self.owner,
                           ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else ""), schedule)
            self.zo.run_in_place(schedule)
            self.dual.remove()
            self.dual = None

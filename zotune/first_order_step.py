"""The first-order part of a `ZOTrainer` step (rule `addax`): backprop on the rows of each
micro-batch that `zotune.first_order.split_rows` gives the rule's `max_tokens`, the ZO forwards on
the rest.

g¹ accumulates in the parameters' .grad, each micro-batch's loss weighted by its items (as the ZO
part weighs them); before the optimizer step it is divided by the step's total items, so that
g¹ = Σ_m items_m·∇L_m / Σ_m items_m, the mean gradient of all the step's backprop rows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import TrainerCallback
from transformers.utils import logging

from zotune.first_order import split_rows
from zotune.optim import ZOOptimizer

logger = logging.get_logger("zotune")


class FirstOrderRows(TrainerCallback):
    """`backprop` per micro-batch; the average at `on_pre_optimizer_step`. `compute_loss` and
    `items` (what a micro-batch's loss is a mean over) are the trainer's."""

    def __init__(self, zo: ZOOptimizer, compute_loss: Callable, items: Callable[[dict], int]):
        self.zo, self.compute_loss, self.items = zo, compute_loss, items
        self.step_items = 0  # the backprop items of the step so far
        self._warned_no_rows = False

    def backprop(self, model, inputs: dict) -> tuple[dict, tuple[float, int] | None]:
        """The rows left for the ZO forwards, and (the backprop rows' loss, their items) or None."""
        budget = self.zo.rule.config.max_tokens
        part, rest, _ = split_rows(inputs, budget)
        if part is None:
            if not self._warned_no_rows:
                self._warned_no_rows = True
                logger.warning("zotune: rule %r: no row of a batch fits max_tokens=%d (with one row left for ZO), "
                               "so such a step is ZO alone, scaled by alpha; raise max_tokens to backprop the "
                               "shortest rows", self.zo.rule.name, budget)
            return inputs, None
        items = self.items(part)
        with torch.enable_grad():
            loss = self.compute_loss(model, dict(part))
            (loss * items).backward()
        self.step_items += items
        return rest, (loss.item(), items)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.step_items:
            for _, p, _ in self.zo.named_params():
                if p.grad is not None:
                    p.grad.div_(self.step_items)
        self.step_items = 0

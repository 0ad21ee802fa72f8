"""What a `ZOTrainer` adds to its logs, and its count of non-finite steps.

Between two logging steps it keeps the micro-batches' L+ and L− and the optimizer steps' projected
gradients; `into(logs)` adds their means (and the mean |g|), the run's non-finite steps so far, the
steps whose rule applied nothing (fzoo's and es's when the losses did not spread) and,
data parallel, the bytes a step sends. A step whose g is None had non-finite losses: too many of
them in a row stop the run (`zotune.nonfinite`).
"""

from __future__ import annotations

from transformers import TrainerCallback

from zotune.nonfinite import NonFiniteSteps



class StepStats(TrainerCallback):
    """The statistics of `trainer` (the `ZOTrainer` that adds it)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.nonfinite = NonFiniteSteps(trainer.args.zo_max_nonfinite, "lower learning_rate or zo_eps. "
                                        "Nothing was applied for those steps.")
        self.skipped = 0  # finite steps whose rule applied nothing (`skipped` in their record)
        self._clear()

    def _clear(self) -> None:
        self.loss_plus, self.loss_minus, self.projected_grad = [], [], []

    def micro_batch(self, losses: list[tuple[float, float]]) -> None:
        self.loss_plus += [lp for lp, _ in losses]
        self.loss_minus += [lm for _, lm in losses]

    def on_optimizer_step(self, args, state, control, **kwargs):
        record = self.trainer.zo.last_record
        self.nonfinite.count(record["step"], finite=record["g"] is not None)
        if record["g"] is not None:
            self.projected_grad += record["g"]
        self.skipped += bool(record.get("skipped"))

    def into(self, logs: dict) -> None:
        """Add the means since the last log to a training log (one with "loss")."""
        if "loss" not in logs or not self.loss_plus:
            return
        logs["loss_plus"] = sum(self.loss_plus) / len(self.loss_plus)
        logs["loss_minus"] = sum(self.loss_minus) / len(self.loss_minus)
        if self.projected_grad:
            logs["projected_grad"] = sum(self.projected_grad) / len(self.projected_grad)
            logs["projected_grad_abs"] = sum(abs(g) for g in self.projected_grad) / len(self.projected_grad)
        logs["nonfinite_steps"] = self.nonfinite.total
        if self.skipped:
            logs["skipped_steps"] = self.skipped
        last = self.trainer.zo.last_record or {}
        if "comm_bytes" in last:
            logs["comm_bytes_per_step"] = last["comm_bytes"]  # data parallel: all a step sends
        self._clear()

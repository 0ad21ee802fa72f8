"""ZO versions of trl's SFT and DPO trainers: trl's loss and metrics, ZOTrainer's step.

    pip install "zotune[trl]"

    from zotune.integrations.trl import ZOSFTConfig, ZOSFTTrainer
    args = ZOSFTConfig(output_dir="out", learning_rate=1e-4, zo_eps=1e-3, max_steps=100)
    ZOSFTTrainer(model=model, args=args, train_dataset=data).train()

Each config is trl's with `ZOConfig`'s `zo_*` fields; each trainer is trl's with `ZOTrainer`'s
`training_step` (first in the method order). trl's `compute_loss` is what every schedule trains
on: under `dual` it runs once per half of the doubled forward (`zotune.dual.call_halves`), and
where it reads a trained weight outside the module that owns it (trl's fused LM head reads the
head's weight directly), the dual check on the first batch (`zotune.step_losses`) switches the run to
the in-place `fused` schedule.

Two things a ZO step changes for trl, set right here:
- trl files its metrics under ``self.model.training``; ZO runs its forwards with dropout off
  (eval mode), so while a ZO step runs trl's loss the top module reports training, and the
  metrics are logged under their training names (``entropy``, not ``eval_entropy``);
- a ZO step calls the loss several times on one batch (± per direction, and the dual check), so a
  counter trl adds to per call (SFT's ``num_tokens``) counts the batch once.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

try:
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer
except ImportError as e:  # pragma: no cover - the extra is missing
    raise ImportError('zotune.integrations.trl needs trl: pip install "zotune[trl]"') from e

from zotune.trainer import ZOConfig, ZOTrainer


class _ZOStepOfTrl:
    """Between ZOTrainer and a trl trainer: trl's loss sees a training step, and counts its batch once."""

    _counted_once = ("_total_train_tokens",)  # per-call counters of trl's compute_loss
    _counters: dict | None = None  # their values when the running ZO step began; None outside one

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._counters = {k: getattr(self, k) for k in self._counted_once if hasattr(self, k)}
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            self._counters = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._counters is None:  # evaluation, prediction
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        for k, v in self._counters.items():  # each call counts from the step's start: the batch once
            setattr(self, k, v)
        with _reports_training(self.model):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


@contextmanager
def _reports_training(model) -> Iterator[None]:
    """The top module says it is training; its submodules (dropout) stay in eval mode."""
    model.training = True
    try:
        yield
    finally:
        model.training = False


@dataclass
class ZOSFTConfig(ZOConfig, SFTConfig):
    """trl's `SFTConfig` with the `zo_*` fields of `ZOConfig`."""


class ZOSFTTrainer(_ZOStepOfTrl, ZOTrainer, SFTTrainer):
    """trl's `SFTTrainer` trained by zeroth-order steps; give it a `ZOSFTConfig`."""


@dataclass
class ZODPOConfig(ZOConfig, DPOConfig):
    """trl's `DPOConfig` with the `zo_*` fields of `ZOConfig`."""


class ZODPOTrainer(_ZOStepOfTrl, ZOTrainer, DPOTrainer):
    """trl's `DPOTrainer` trained by zeroth-order steps (forward passes only); give it a `ZODPOConfig`.
    The reference log-probabilities come as trl computes them: the adapter-disabled model for a
    peft policy, a reference model, or `precompute_ref_log_probs`."""

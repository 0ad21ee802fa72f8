"""ZO versions of trl's SFT, DPO and GRPO trainers: trl's loss and metrics, ZOTrainer's step.

    pip install "zotune[trl]"

    from zotune.integrations.trl import ZOSFTConfig, ZOSFTTrainer
    args = ZOSFTConfig(output_dir="out", learning_rate=1e-4, zo_eps=1e-3, max_steps=100)
    ZOSFTTrainer(model=model, args=args, train_dataset=data).train()

Each config is trl's with `ZOConfig`'s `zo_*` fields; the SFT and DPO trainers are trl's with `ZOTrainer`'s
`training_step` (first in the method order). `ZOGRPOTrainer` takes `GRPOTrainer`'s arguments and trains on
the rewards by evolution strategies (`zotune.reward`): it needs none of trl's gradient machinery.

For SFT and DPO, trl's `compute_loss` is what every schedule trains
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
from dataclasses import dataclass, field

try:
    from trl import DPOConfig, DPOTrainer, GRPOConfig, SFTConfig, SFTTrainer
except ImportError as e:  # pragma: no cover - the extra is missing
    raise ImportError('zotune.integrations.trl needs trl: pip install "zotune[trl]"') from e

from zotune.reward.population import Generation
from zotune.reward.trainer import ZORewardTrainer
from zotune.trainer import ZOConfig, ZOTrainer


class _ZOStepOfTrl:
    """Between ZOTrainer and a trl trainer: trl's loss sees a training step, and counts its batch once."""

    _counted_once = ("_total_train_tokens",)  # per-call counters of trl's compute_loss

    def __init__(self, *args, **kwargs):
        self._counters: dict | None = None  # their values when the running ZO step began; None outside one
        super().__init__(*args, **kwargs)

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


@dataclass
class ZOGRPOConfig(ZOConfig, GRPOConfig):
    """trl's `GRPOConfig` with the `zo_*` fields of `ZOConfig`, for `ZOGRPOTrainer`.

    What the ZO trainer reads of trl's fields: `num_generations`, the population (num_generations / 2
    antithetic pairs θ ± εz_k: it sets `zo_num_directions`, and under `dual` `zo_slice_directions`, so the
    population decodes in one `generate`); `max_completion_length`; `temperature` (sampled with common random
    numbers, `zotune.reward.population.GumbelSampling`; 0 is greedy); `reward_weights`.
    `per_device_train_batch_size` counts completions, as in trl: a step's prompts are
    per_device_train_batch_size / num_generations, each answered by every member. trl's loss settings
    (beta, loss_type, ...) shape its gradient and are not read.
    """

    zo_rule: str = field(default="es", metadata={"help": "The ZO update rule; es: evolution strategies' update."})

    def __post_init__(self):
        pairs = self.num_generations // 2 if self.num_generations else 0
        if self.num_generations is None or self.num_generations < 2 or self.num_generations % 2:
            raise ValueError(f"num_generations={self.num_generations}: the population is antithetic pairs θ ± εz_k, "
                             "so it must be even and at least 2")
        if self.per_device_train_batch_size % self.num_generations:
            raise ValueError(f"per_device_train_batch_size={self.per_device_train_batch_size} counts completions: "
                             f"a multiple of num_generations={self.num_generations} (prompts × members)")
        if self.max_completion_length is None:
            raise ValueError("max_completion_length: give the tokens to generate per completion")
        if self.zo_num_directions not in (1, pairs):
            raise ValueError(f"zo_num_directions={self.zo_num_directions}: set by num_generations "
                             f"({self.num_generations} members = {pairs} pairs); leave it unset")
        self.zo_num_directions = pairs
        self.zo_slice_directions = self.zo_slice_directions or (pairs > 1 and self.zo_schedule == "dual")
        super().__post_init__()

    @property
    def prompts_per_step(self) -> int:
        return self.per_device_train_batch_size // self.num_generations


class ZOGRPOTrainer(ZORewardTrainer):
    """trl's `GRPOTrainer` call (`model`, `reward_funcs`, `args`, `train_dataset`, `processing_class`),
    trained by evolution strategies on the ZO engine: forward passes only. Give it a `ZOGRPOConfig`."""

    def __init__(self, model, reward_funcs, args: ZOGRPOConfig, train_dataset=None, eval_dataset=None,
                 processing_class=None, **kwargs):
        if not isinstance(args, ZOGRPOConfig):
            raise TypeError(f"ZOGRPOTrainer needs args=ZOGRPOConfig(...), not {type(args).__name__}")
        generation = Generation(args.max_completion_length, temperature=args.temperature or None)
        super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, reward_funcs=reward_funcs,
                         reward_weights=args.reward_weights, generation=generation, **kwargs)
        self._train_batch_size = args.prompts_per_step  # the Trainer's loader batch: prompts, not completions

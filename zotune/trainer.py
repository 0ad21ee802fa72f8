"""`ZOTrainer`: a `transformers.Trainer` whose optimizer is zeroth-order.

The training loop, LR schedulers, callbacks, evaluation, checkpoint format and
`resume_from_checkpoint` are the Trainer's own. Overridden, and why:
- `create_optimizer` builds `ZOOptimizer` and the parts of a step (below);
- `training_step` runs the ± forwards instead of forward + backward;
- `log` adds the ZO statistics; `_get_grad_norm` gives none (there is no gradient);
- `evaluate`, `predict` and `save_model` first bring displaced weights back to θ (in-place schedules);
- `_save_checkpoint` makes the trajectory durable first and publishes atomically (zotune.checkpoints);
- `_run_epoch` takes no step past max_steps in a run resumed at its last step;
- `_move_model_to_device` leaves offloaded blocks on the host (zotune.offload);
- `_set_signature_columns_if_needed` and `_prepare_inputs` carry each row's dataset index (influence);
- sharded runs read and write checkpoints as shards (`zotune.fsdp_checkpoints`).

The parts of a step, each with one job: `StepValue` (a batch's value: the loss or an objective,
with the rows' own losses), `StepLosses` (the (L+, L−) pairs: the dual engine, its check, halves
and slices), `FirstOrderRows` (Addax's backprop rows), `TrajectoryCallback` (the log replay reads)
and `StepStats` (what is logged, and the non-finite steps).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable
from dataclasses import dataclass, field

import datasets
import torch
from transformers import Trainer, TrainingArguments

from zotune.batch import batch_rows
from zotune.checkpoints import SaveOnInterrupt, save_checkpoint_atomically
from zotune.data.collate import INDEX, IndexedCollator
from zotune.dual import model_loss
from zotune.eps import swamp_error, trainable_rms
from zotune.errors import UserError
from zotune.first_order_step import FirstOrderRows
from zotune.fsdp_checkpoints import ShardedCheckpoints
from zotune.influence.rows import RowRecorder, attributable, row_items
from zotune.methods import Estimator, build_estimator, build_rule
from zotune.models import contiguous_head_input, forward_accepts, stable_name, trainable_parameters
from zotune.nonfinite import NonFiniteLossError  # noqa: F401 - imported from here too
from zotune.objectives import load_objective
from zotune.offload import BlockOffloader
from zotune.optim import ZOOptimizer
from zotune.settings import ZOSettings, config_fields, from_config
from zotune.step_losses import StepLosses, StepValue
from zotune.step_stats import StepStats
from zotune.trajectory_callback import TrajectoryCallback


# TrainingArguments plus a `zo_<name>` field per ZO setting, generated from `zotune.settings.ZOSettings`
ZOSettingsArguments = dataclasses.make_dataclass("ZOSettingsArguments", config_fields(), bases=(TrainingArguments,))
ZOSettingsArguments.__module__ = __name__


@dataclass
class ZOConfig(ZOSettingsArguments):
    """`TrainingArguments` plus the zeroth-order settings (all prefixed `zo_`): one per field of
    `zotune.settings.ZOSettings` (its rule and estimator as `zo_rule` + `zo_rule_kwargs`, ...),
    validated by it, and which parameters train."""

    zo_include: list[str] = field(
        default_factory=list, metadata={"help": "Regexes: train only parameters whose stable name matches one."}
    )
    zo_exclude: list[str] = field(
        default_factory=list, metadata={"help": "Regexes: never train parameters whose stable name matches one."}
    )
    zo_trajectory: bool = field(
        default=True, metadata={"help": "Append every step to output_dir/zo_trajectory.jsonl (for replay)."}
    )
    max_grad_norm: float = field(default=0.0, metadata={"help": (
        "Must stay 0: a ZO step has no gradient to clip, and Addax's first-order part (zo_rule='addax') is not "
        "clipped either; any other value is refused rather than ignored.")})

    def __post_init__(self):
        super().__post_init__()
        if self.torch_compile and self.zo_schedule == "dual":
            raise ValueError("torch_compile=True with zo_schedule='dual': the dual schedule gives each module new "
                             "perturbed weights on every call, which recompiles the model again and again (a 3-step "
                             "run took minutes instead of a second); set torch_compile=False")
        if self.max_grad_norm:
            raise ValueError(f"max_grad_norm={self.max_grad_norm}: zotune clips no gradient (ZO estimates only a "
                             "directional derivative, and Addax's first-order part is not clipped); leave it at 0")
        load_objective(self.zo_settings().objective)  # a bad import path fails here, before training starts

    def zo_settings(self) -> ZOSettings:
        """The `zo_*` fields as the settings model, validated (a refusal is a ValueError naming the zo_ field)."""
        return from_config(self)


class ZOTrainer(ShardedCheckpoints, Trainer):
    """A drop-in `Trainer` that trains with SPSA estimates from pairs of forward passes."""

    args: ZOConfig
    # with zo_slice_directions each direction takes its own rows of a batch (a reward step's directions each
    # generate for all of them: zotune.reward)
    slices_rows = True
    # the pairs' values are minus a mean reward, not a loss (zotune.reward): the trajectory header says so
    objective_is_reward = False

    def __init__(self, *args, **kwargs):
        self.offloader: BlockOffloader | None = None
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, ZOConfig):
            raise TypeError(f"ZOTrainer needs args=ZOConfig(...), which adds the zo_* settings; got a "
                            f"{type(self.args).__name__} (given no args, the Trainer makes a plain TrainingArguments)")
        self.requested = self.args.zo_settings()
        contiguous_head_input(self.model)  # a model loaded outside zotune too
        if self.args.zo_offload == "cpu" and self.offloader is None:
            self._attach_offloader(self.model, self.args.device)
        _check_run(self.args, self.requested, self.model, self.slices_rows)
        # set by create_optimizer: the optimizer and the parts of a step
        self.zo: ZOOptimizer | None = None
        self.value: StepValue | None = None
        self.losses: StepLosses | None = None
        self.first_order: FirstOrderRows | None = None
        self.forward_kwargs: dict = {}  # what every loss forward is also given
        self.fsdp_units = self.shard() if self.requested.shard == "fsdp" else None
        # only the main process writes the log (every rank can replay it)
        self.trajectory = TrajectoryCallback(self, writes=self.args.zo_trajectory and self.args.should_save)
        self.stats = StepStats(self)
        for callback in (self.trajectory, self.stats, SaveOnInterrupt()):  # the record before a non-finite stop
            self.add_callback(callback)
        # ZO runs no backward: under torch.distributed the model is not wrapped in DDP (which would
        # allocate gradient buckets and sync buffers every forward); ranks exchange only the
        # step's losses (ZOOptimizer._reduce_across_ranks)
        self.accelerator.prepare_model = functools.partial(self.accelerator.prepare_model, evaluation_mode=True)
        # every batch carries its rows' dataset indices, for the per-example record (zotune.influence)
        self.data_collator = IndexedCollator(self.data_collator)
        if isinstance(self.train_dataset, datasets.Dataset) and INDEX not in self.train_dataset.column_names:
            self.train_dataset = self.train_dataset.add_column(INDEX, list(range(len(self.train_dataset))))
        self._batch_index: torch.Tensor | None = None

    @property
    def settings(self) -> ZOSettings:
        """The settings the steps run with (the trajectory header records them): those asked for,
        with the schedule the optimizer settled on (the dual check may move it in place)."""
        if self.zo is None:
            return self.requested
        return self.requested.model_copy(update={"schedule": self.zo.schedule,
                                                 "slice_directions": self.zo.slice_directions})

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = model if model is not None else self.model
            named = trainable_parameters(model, self.args.zo_include, self.args.zo_exclude)
            # kept as a direct reference: accelerate wraps self.optimizer, and state put on
            # the wrapper would never reach the optimizer that updates the weights
            self.zo = ZOOptimizer(named, self.requested, lr=self.args.learning_rate,
                                  weight_decay=self.args.weight_decay,
                                  no_decay=no_decay_names(named, self.get_decay_parameter_names(model)),
                                  seed=self.args.seed)
            self.optimizer = self.zo
            # a loss forward needs no KV cache; unasked, transformers keeps every layer's keys and values
            self.forward_kwargs = {"use_cache": False} if forward_accepts(model, "use_cache") else {}
            if self.offloader is not None:
                # looked up per call: accelerate reloads the optimizer's state into new dicts
                self.offloader.state_of = lambda param: self.zo.state[param]
                self.offloader.travelling_keys = ("master", *self.zo.estimator.direction_state)
            objective = load_objective(self.args.zo_objective, self.preprocess_logits_for_metrics)
            rows = RowRecorder(self.zo.offsets, self.zo.q) if attributable(self.zo, objective) else None
            self.value = StepValue(self.compute_loss, objective, rows, self._row_loss, type(self).__name__)
            self.losses = StepLosses(model, self.zo, self.value, type(self).__name__)
            if self.zo.rule.first_order:
                self.first_order = FirstOrderRows(self.zo, self.compute_loss, self.value.items)
                self.add_callback(self.first_order)
        return self.optimizer

    def _row_loss(self, model):
        """The loss of one row's outputs and labels, reduced as compute_loss reduces a batch's."""
        return self.compute_loss_func or functools.partial(model_loss, model)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if INDEX not in self._signature_columns:  # kept by remove_unused_columns; taken out of every batch
            self._signature_columns.append(INDEX)

    def _prepare_inputs(self, inputs):
        inputs = dict(super()._prepare_inputs(inputs))
        self._batch_index = inputs.pop(INDEX, None)
        return inputs

    def _attach_offloader(self, model, device) -> None:
        name = self.args.zo_offload_transfer_dtype
        self.offloader = BlockOffloader(model, device, transfer_dtype=getattr(torch, name) if name else None)

    def _move_model_to_device(self, model, device) -> None:
        if getattr(self.args, "zo_offload", "none") == "cpu":  # blocks stay home; not a ZOConfig: __init__ says so
            self._attach_offloader(model, device)
        else:
            super()._move_model_to_device(model, device)

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """One micro-batch's ± forwards, with dropout off (both passes must see the same function);
        the model is left in training mode, as a plain Trainer's step leaves it for the callbacks
        and logs that follow (trl files its metrics by it)."""
        model.eval()
        try:
            inputs = {**self._prepare_inputs(inputs), **self.forward_kwargs}
            backprop = None
            if self.first_order is not None:  # backprop on the rows the budget allows, the ZO forwards on the rest
                inputs, backprop = self.first_order.backprop(model, inputs)
            if not self.losses.checked:  # settles the schedule, which the trajectory header records
                self.losses.check_dual(model, inputs)
            if not self.trajectory.begun:
                self.trajectory.begin(self.state.global_step)
            items = self.value.items(inputs)
            losses = self.zo.estimate(self.losses.loss_fn(model, inputs), self.state.global_step, items)
            if self.value.rows is not None:
                self.value.rows.micro_batch(self._batch_index, row_items(inputs.get("labels"), batch_rows(inputs)))
            if self.offloader is not None:
                self.offloader.wait()  # the update pass reads the written-back weights on the host
            self.stats.micro_batch(losses)
            return self._returned_loss(losses, items, backprop)
        finally:
            model.train()

    def _returned_loss(self, losses, zo_items: int, backprop: tuple[float, int] | None) -> torch.Tensor:
        """The micro-batch's loss as the Trainer sums it over a step's micro-batches: the mean of its
        pairs (over `zo_items`), with the backprop rows' loss weighed in by items."""
        mean = sum(lp + lm for lp, lm in losses) / (2 * len(losses))
        if backprop is not None:
            fo_loss, fo_items = backprop
            mean = (mean * zo_items + fo_loss * fo_items) / (zo_items + fo_items)
        return torch.tensor(mean / self.current_gradient_accumulation_steps, device=self.args.device)

    # -- every read of the weights sees them with all updates applied ---------------------

    def flush(self) -> None:
        if self.zo is not None:
            if self.offloader is not None:
                self.offloader.wait()
            self.zo.flush()

    def evaluate(self, *args, **kwargs):
        self.flush()
        return super().evaluate(*args, **kwargs)

    def predict(self, *args, **kwargs):
        self.flush()
        return super().predict(*args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        self.flush()
        return super().save_model(output_dir, _internal_call)

    def _get_grad_norm(self, model, grad_norm=None):
        return None  # there is no gradient; the projected gradient is logged instead

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        self.stats.into(logs)
        super().log(logs, start_time)

    def _run_epoch(self, *args, **kwargs):
        # transformers 5.24 checks max_steps only after a step: a run resumed from the checkpoint of
        # its last step (say after a crash before the final save) would train one step more
        if 0 < self.state.max_steps <= self.state.global_step:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, written to a staging dir and renamed into place (zotune.checkpoints),
        after the trajectory is fsynced: a published checkpoint-N always has steps < N durably logged."""
        if self.trajectory.writer is not None:
            self.trajectory.writer.sync()
        save_checkpoint_atomically(self, super()._save_checkpoint, model, trial)


def _check_run(args: ZOConfig, settings: ZOSettings, model, slices_rows: bool) -> None:
    """What a run cannot do, refused with the weights at hand, before any evaluation or step."""
    trainable = trainable_parameters(model, args.zo_include, args.zo_exclude)
    swamped = swamp_error(args.zo_eps, trainable_rms(p for _, p in trainable), "zo.eps (ZOConfig.zo_eps)")
    if swamped:  # zotune.eps
        raise UserError(swamped)
    if slices_rows and settings.slice_directions and args.per_device_train_batch_size < settings.num_directions:
        raise UserError(f"zo.slice_directions gives each of zo.num_directions={settings.num_directions} "
                        f"directions its own rows of a batch: train.per_device_train_batch_size="
                        f"{args.per_device_train_batch_size} is too small (best a multiple of it)")
    rule = build_rule(settings.rule)
    if rule.first_order and args.world_size > 1:
        raise UserError(f"zo.rule {rule.name!r} backpropagates on each rank alone and would not average its "
                        "first-order gradient: run it in one process")
    estimator = settings.estimator
    estimator = estimator if isinstance(estimator, Estimator) else build_estimator(estimator)
    try:  # an estimator's limit on the trained parameters (cge: their count), before any forward
        estimator.num_directions({n: p.numel() for n, p in trainable}, settings.num_directions)
    except ValueError as e:
        raise UserError(str(e)) from None


def no_decay_names(named: Iterable[tuple[str, torch.nn.Parameter]], decay_names: Iterable[str]) -> list[str]:
    """The names in `named` (stable names) that weight decay skips: those not among `decay_names`,
    the full names `Trainer.get_decay_parameter_names` gives (HF's rule: biases and norms)."""
    decay = {stable_name(n) for n in decay_names}
    return [n for n, _ in named if n not in decay]

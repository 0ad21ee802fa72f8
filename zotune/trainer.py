"""`ZOTrainer`: a `transformers.Trainer` whose optimizer is zeroth-order.

Only narrow hooks are overridden: `create_optimizer` builds `ZOOptimizer`,
`training_step` runs the ± forwards instead of forward + backward, and `log`
adds the ZO statistics. The training loop, LR schedulers, callbacks,
evaluation, checkpointing and `resume_from_checkpoint` are the Trainer's own.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property

import datasets
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer import SCHEDULER_NAME
from transformers.utils import logging

from zotune.checkpoints import SaveOnInterrupt, save_checkpoint_atomically
from zotune.dual import DualEngine, DualRefused, OutsideReads, call_halves, call_slices, losses_agree, model_loss
from zotune.eps import swamp_error, trainable_rms
from zotune.errors import UserError
from zotune.models import forward_accepts, stable_name, trainable_parameters
from zotune.first_order import save_gradients, split_rows
from zotune.fsdp import full_state_dict, load_sharded, optimizer_file, save_sharded, shard_model, whole
from zotune.data.collate import INDEX, IndexedCollator
from zotune.influence.rows import RowRecorder, row_items, row_values
from zotune.methods import Estimator, build_estimator, build_rule
from zotune.nonfinite import NonFiniteLossError, NonFiniteSteps  # noqa: F401 - NonFiniteLossError is imported from here too
from zotune.objectives import Objective, load_objective
from zotune.offload import BlockOffloader
from zotune.optim import ZOOptimizer
from zotune.settings import ZOSettings, config_fields, from_config, header_fields, with_lazy_update_decided
from zotune.trajectory import TrajectoryWriter, params_digest

logger = logging.get_logger("zotune")
# the start-up probe of the dual schedule runs this many rows of the first batch: it costs a
# doubled forward of them once, and 2 rows still tell a split along the batch from a broadcast
PROBE_ROWS = 2


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


class ZOTrainer(Trainer):
    """A drop-in `Trainer` that trains with SPSA estimates from pairs of forward passes."""

    args: ZOConfig

    def __init__(self, *args, **kwargs):
        self.offloader: BlockOffloader | None = None
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, ZOConfig):
            raise TypeError(f"ZOTrainer needs args=ZOConfig(...), which adds the zo_* settings; got a "
                            f"{type(self.args).__name__} (given no args, the Trainer makes a plain TrainingArguments)")
        # the settings the steps run with (the header records them); this trainer flushes before every read
        self.settings = with_lazy_update_decided(self.args.zo_settings())
        if self.args.zo_offload == "cpu" and self.offloader is None:
            self._attach_offloader(self.model, self.args.device)
        # with the weights at hand, before any evaluation or step (zotune.eps)
        trainable = trainable_parameters(self.model, self.args.zo_include, self.args.zo_exclude)
        swamped = swamp_error(self.args.zo_eps, trainable_rms(p for _, p in trainable), "zo.eps (ZOConfig.zo_eps)")
        if swamped:
            raise UserError(swamped)
        if self.settings.slice_directions and self.args.per_device_train_batch_size < self.settings.num_directions:
            raise UserError(f"zo.slice_directions gives each of zo.num_directions={self.settings.num_directions} "
                            f"directions its own rows of a batch: train.per_device_train_batch_size="
                            f"{self.args.per_device_train_batch_size} is too small (best a multiple of it)")
        rule = build_rule(self.settings.rule)
        if rule.first_order and self.args.world_size > 1:
            raise UserError(f"zo.rule {rule.name!r} backpropagates on each rank alone and would not average its "
                            "first-order gradient: run it in one process")
        estimator = self.settings.estimator
        estimator = estimator if isinstance(estimator, Estimator) else build_estimator(estimator)
        try:  # an estimator's limit on the trained parameters (cge: their count), before any forward
            estimator.num_directions({n: p.numel() for n, p in trainable}, self.settings.num_directions)
        except ValueError as e:
            raise UserError(str(e)) from None
        self.zo: ZOOptimizer | None = None
        self.dual: DualEngine | None = None
        self._zo_log = {"loss_plus": [], "loss_minus": [], "projected_grad": []}
        self.nonfinite = NonFiniteSteps(self.args.zo_max_nonfinite, "lower learning_rate or zo_eps. "
                                        "Nothing was applied for those steps.")
        self.fsdp_units = self._shard() if self.settings.shard == "fsdp" else None
        # only the main process writes the log (every rank can replay it)
        writes_log = self.args.zo_trajectory and self.args.should_save
        self.trajectory = TrajectoryWriter(self.args.output_dir) if writes_log else None
        self.add_callback(_ZOStepHook(self))
        # ZO runs no backward: under torch.distributed the model is not wrapped in DDP (which would
        # allocate gradient buckets and sync buffers every forward); ranks exchange only the
        # step's losses (ZOOptimizer._reduce_across_ranks)
        self.accelerator.prepare_model = functools.partial(self.accelerator.prepare_model, evaluation_mode=True)
        self.add_callback(SaveOnInterrupt())
        # every batch carries its rows' dataset indices, for the per-example record (zotune.influence)
        self.data_collator = IndexedCollator(self.data_collator)
        if isinstance(self.train_dataset, datasets.Dataset) and INDEX not in self.train_dataset.column_names:
            self.train_dataset = self.train_dataset.add_column(INDEX, list(range(len(self.train_dataset))))
        self.rows: RowRecorder | None = None
        self._batch_index: torch.Tensor | None = None

    def _shard(self) -> list[torch.nn.Module]:
        """`zo_shard='fsdp'`: FSDP2 over the ranks (zotune.fsdp), before the optimizer takes the weights."""
        import torch.distributed as dist

        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        if plugin is not None and plugin.fsdp_version != 2:
            raise UserError("accelerate's FSDP plugin is set to FSDP1, which flattens the weights: ZO shards them "
                            "with FSDP2 (fsdp_version: 2 in the accelerate config)")
        if not (dist.is_available() and dist.is_initialized()):
            raise UserError("zo.shard: fsdp (ZOConfig.zo_shard) shards the weights across the ranks of "
                            "torch.distributed: launch with torchrun or accelerate launch (README: Multi-GPU and "
                            "multi-node)")
        if self.args.load_best_model_at_end:
            raise UserError("zo.shard: fsdp saves sharded checkpoints, which load_best_model_at_end does not read")
        self.is_fsdp_enabled = False  # the Trainer's FSDP paths would save a torch optimizer's state: ours are below
        return shard_model(self.model, reshard_after_forward=plugin.reshard_after_forward if plugin else True)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = model if model is not None else self.model
            named = trainable_parameters(model, self.args.zo_include, self.args.zo_exclude)
            # kept as a direct reference: accelerate wraps self.optimizer, and state put on
            # the wrapper would never reach the optimizer that updates the weights
            self.zo = ZOOptimizer(named, self.settings, lr=self.args.learning_rate,
                                  weight_decay=self.args.weight_decay,
                                  no_decay=no_decay_names(named, self.get_decay_parameter_names(model)),
                                  seed=self.args.seed)
            self.optimizer = self.zo
            if self.settings.schedule == "dual":
                self.dual = DualEngine(model, self.zo)
            if self.offloader is not None:
                # looked up per call: accelerate reloads the optimizer's state into new dicts
                self.offloader.state_of = lambda param: self.zo.state[param]
                self.offloader.travelling_keys = ("master", *self.zo.estimator.direction_state)
            if self._attributable():
                self.rows = RowRecorder(self.zo.offsets, self.zo.q)
        return self.optimizer

    def _attributable(self) -> bool:
        """Whether a step's records keep each row's projection: a ZO-SGD step on the loss, whose g is the
        rows' weighted mean (zotune.influence.rows); not with an estimator that takes L(θ) too, with
        directions on row slices, or with cge (one direction per trained element: d×B numbers a step)."""
        return (self.zo.rule.name == "sgd" and not self.zo.estimator.loss_at_theta and self._objective is None
                and not self.zo.slice_directions and self.zo.estimator.name != "cge")

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if INDEX not in self._signature_columns:  # kept by remove_unused_columns; taken out of every batch
            self._signature_columns.append(INDEX)

    def _prepare_inputs(self, inputs):
        inputs = dict(super()._prepare_inputs(inputs))
        self._batch_index = inputs.pop(INDEX, None)
        return inputs

    # -- offloading: blocks stay home instead of moving to the device -------------------

    def _attach_offloader(self, model, device) -> None:
        name = self.args.zo_offload_transfer_dtype
        dtype = getattr(torch, name) if name is not None else None
        self.offloader = BlockOffloader(model, device, transfer_dtype=dtype)

    def _move_model_to_device(self, model, device) -> None:
        if getattr(self.args, "zo_offload", "none") == "cpu":  # not a ZOConfig: __init__ says so next
            self._attach_offloader(model, device)
        else:
            super()._move_model_to_device(model, device)

    # -- the step -------------------------------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """One micro-batch's ± forwards, with dropout off (both passes must see the same function);
        the model is left in training mode, as a plain Trainer's step leaves it for the callbacks
        and logs that follow (trl files its metrics by it)."""
        model.eval()
        try:
            return self._zo_micro_batch(model, inputs)
        finally:
            model.train()

    def _zo_micro_batch(self, model, inputs) -> torch.Tensor:
        inputs = _without_kv_cache(model, self._prepare_inputs(inputs))
        first_order = None
        if self.zo.rule.first_order:  # backprop on the rows the budget allows, the ZO forwards on the rest
            inputs, first_order = self._first_order_rows(model, inputs)
        if self.dual is not None and not self._dual_probed:
            self._probe_dual(model, inputs)
        if not self._trajectory_begun:  # after the probe, which may change the schedule
            self.begin_trajectory(self.state.global_step)

        if self.dual is not None:
            def loss_fn(s: int, k):
                if isinstance(k, tuple):  # slice_directions: all directions, one row slice each
                    return self._slice_losses(model, inputs, s, k)
                if self._dual_split:
                    return self._half_losses(model, inputs, (s, k))
                return self._sign_losses(model, inputs, (s, k))
        else:
            def loss_fn() -> float:
                return self._value(model, inputs)

        losses = self.zo.estimate(loss_fn, self.state.global_step, self._items(inputs))
        if self.rows is not None:
            rows = len(next(v for v in inputs.values() if torch.is_tensor(v) and v.dim()))
            self.rows.micro_batch(self._batch_index, row_items(inputs.get("labels"), rows))
        if self.offloader is not None:
            self.offloader.wait()  # the update pass reads the written-back weights on the host
        mean = sum(lp + lm for lp, lm in losses) / (2 * len(losses))
        if first_order is not None:  # the loss of the whole micro-batch, both parts by their items
            (fo_loss, fo_items), zo_items = first_order, self._items(inputs)
            mean = (mean * zo_items + fo_loss * fo_items) / (zo_items + fo_items)
        self._zo_log["loss_plus"] += [lp for lp, _ in losses]
        self._zo_log["loss_minus"] += [lm for _, lm in losses]
        # the Trainer sums the returned loss over micro-batches of a step
        return torch.tensor(mean / self.current_gradient_accumulation_steps, device=self.args.device)

    _warned_no_first_order_rows = False

    def _first_order_rows(self, model, inputs: dict) -> tuple[dict, tuple[float, int] | None]:
        """Backpropagate the loss of the rows `zotune.first_order.split_rows` gives the rule's
        `max_tokens`: g¹ accumulates in the parameters' .grad, each micro-batch weighted by its items
        (as the ZO part weighs them) and divided by the step's total before the update
        (`_average_first_order`). Returns the rows left for the ZO forwards and (its loss, its items)."""
        budget = self.zo.rule.config.max_tokens
        part, rest, _ = split_rows(inputs, budget)
        if part is None:
            if not self._warned_no_first_order_rows:
                self._warned_no_first_order_rows = True
                logger.warning("zotune: rule %r: no row of a batch fits max_tokens=%d (with one row left for ZO), "
                               "so such a step is ZO alone, scaled by alpha; raise max_tokens to backprop the "
                               "shortest rows", self.zo.rule.name, budget)
            return inputs, None
        items = self._items(part)
        with torch.enable_grad():
            loss = self.compute_loss(model, dict(part))
            (loss * items).backward()
        self._first_order_items += items
        return rest, (loss.item(), items)

    _first_order_items = 0

    def _average_first_order(self) -> None:
        """g¹ = Σ_m items_m·∇L_m / Σ_m items_m over the step's micro-batches: the mean gradient of all its
        backprop rows, as their ZO counterpart averages its rows."""
        if self._first_order_items:
            for _, p, _ in self.zo.named_params():
                if p.grad is not None:
                    p.grad.div_(self._first_order_items)
        self._first_order_items = 0

    def _items(self, inputs: dict) -> int:
        """What this micro-batch's value is a mean over: its label tokens for a token-level loss
        (shifted, as a causal LM's loss counts them), else its rows. Micro-batches and
        data-parallel shards are weighted by it."""
        rows = len(next(v for v in inputs.values() if torch.is_tensor(v)))
        if self.args.zo_objective != "loss":
            return rows
        return sum(row_items(inputs.get("labels"), rows))

    _dual_probed = False
    _dual_split = True

    @torch.no_grad()
    def _probe_dual(self, model, inputs) -> None:
        """Before the first step: run the first `PROBE_ROWS` rows of the batch doubled, unperturbed.

        - Every module must split its input along the batch, and each half's value must equal the
          plain one; if not, the two signs run as two forwards through the same wrappers.
        - Nothing may read a trainable weight's values outside the module that owns it (a penalty
          on θ in an overridden `compute_loss`): there it holds θ, not the perturbed copy. If
          something does, the step runs in place (fused), where the weights themselves move.
        Either is said in one line."""
        self._dual_probed = True
        inputs = _first_rows(inputs, PROBE_ROWS)
        plain = self._value(model, inputs)
        reads = OutsideReads(self.dual)
        try:
            with reads:
                halves = self._half_losses(model, inputs, None)
            if not all(losses_agree(h, plain) for h in halves):
                raise DualRefused(f"the halves' values {halves} differ from the plain value {plain}")
        except Exception as e:  # noqa: BLE001 - any failure of the doubled forward: two forwards
            reason = e if isinstance(e, DualRefused) else f"the doubled forward failed: {type(e).__name__}: {e}"
            logger.warning("zotune: %s cannot run both signs in one doubled forward (%s); running them as two "
                           "forwards", type(model).__name__, reason)
            self._dual_split = False
        if self.rows is not None:
            self.rows.discard()  # the probe's values belong to no step
        if reads.found:
            names = sorted(reads.found)
            # a first-order rule takes its gradient at θ between micro-batches, where fused leaves it displaced
            schedule = "sequential" if self.zo.rule.first_order else "fused"
            logger.warning("zotune: %s reads %s outside the module that owns it, where the out-of-place dual "
                           "schedule leaves θ; training in place with the %s schedule (the numbers of sequential)",
                           type(self).__name__,
                           ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else ""), schedule)
            self.zo.run_in_place(schedule)
            self.settings = self.settings.model_copy(update={"schedule": self.zo.schedule,
                                                             "lazy_update": self.zo.lazy_update,
                                                             "slice_directions": self.zo.slice_directions})
            self.dual.remove()
            self.dual = None

    def _sign_losses(self, model, inputs, direction) -> tuple[float, float]:
        """(L+, L−) from two forwards, every wrapped module on its perturbed copies at one sign."""
        values = []
        for half in (0, 1):
            with self.dual.dual_forward(0, direction, half=half):
                values.append(self._value(model, inputs))
        return values[0], values[1]

    def _half_losses(self, model, inputs, direction) -> tuple[float, float]:
        """(L+, L−) of `_value` (compute_loss, however a subclass reduces it, or the objective) on
        the two halves of one dual forward."""
        return call_halves(self.dual, model, direction, lambda: self._value(model, inputs))

    def _slice_losses(self, model, inputs, s: int, ks: tuple[int, ...]) -> list[tuple[float, float]]:
        """Each direction k_i's (L+, L−) on the i-th of len(ks) slices of the batch's rows: from one dual
        forward (`call_slices`) when the slices are equal; else (a last, short batch; a model that cannot
        be split) direction by direction, each on its slice. A batch of fewer rows than directions
        gives each row to every len(rows)-th direction."""
        rows = len(next(v for v in inputs.values() if torch.is_tensor(v) and v.dim()))
        parts = min(rows, len(ks))
        slices = [{key: v.tensor_split(parts)[i % parts] if torch.is_tensor(v) and v.dim() and len(v) == rows else v
                   for key, v in inputs.items()} for i in range(len(ks))]
        if self._dual_split and rows % len(ks) == 0:
            return call_slices(self.dual, model, s, ks, lambda i: self._value(model, slices[i]))
        if self._dual_split:
            return [self._half_losses(model, part, (s, k)) for part, k in zip(slices, ks)]
        return [self._sign_losses(model, part, (s, k)) for part, k in zip(slices, ks)]

    @cached_property
    def _objective(self) -> Objective | None:
        """`zo_objective` as a function of (outputs, labels); None: the loss, as `compute_loss` computes it."""
        return load_objective(self.args.zo_objective, self.preprocess_logits_for_metrics)

    def _value(self, model, inputs) -> float:
        """The value the ZO step sees for `inputs` at the current weights."""
        labels = inputs.get("labels")
        if self._objective is None and self.rows is not None and labels is not None:  # each row's loss too
            value = self._value_by_rows(model, inputs, labels)
            if value is not None:
                return value
        if self._objective is None:
            # a copy: compute_loss pops "labels" from the dict it is given
            return self.compute_loss(model, dict(inputs)).item()
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        return self._objective(model(**inputs), labels)

    _rows_checked = False

    def _value_by_rows(self, model, inputs, labels) -> float | None:
        """The batch's loss, its rows' own losses handed to the recorder. The first batch checks that
        the loss splits into them (None if not: the run then keeps no per-example projections)."""
        checking, self._rows_checked = not self._rows_checked, True
        try:  # a compute_loss override may not give outputs; a model may have no per-row loss
            loss, outputs = self.compute_loss(model, dict(inputs), return_outputs=True)
            values = row_values(outputs, labels, len(labels), self._row_loss(model))
        except Exception as e:  # noqa: BLE001 - a real error in compute_loss raises again in the plain call
            if not checking:
                raise
            return self._without_rows(f"its rows' losses could not be taken ({type(e).__name__}: {e})")
        if checking:
            items = row_items(labels, len(labels))
            mean = sum(v * n for v, n in zip(values, items)) / max(1, sum(items))
            if not math.isclose(mean, loss.item(), rel_tol=1e-4, abs_tol=1e-5):
                # a loss reduced otherwise (a penalty, label smoothing, packed rows): no record rather than a wrong one
                return self._without_rows(f"the rows' own losses average to {mean:.6g}, not the batch's "
                                          f"{loss.item():.6g}")
        self.rows.seen(values)
        return loss.item()

    def _without_rows(self, reason: str) -> None:
        logger.info("zotune: %s: %s, so the steps keep no per-example projections (zotune influence)",
                    type(self).__name__, reason)
        self.rows = None

    def _row_loss(self, model):
        """The loss of one row's outputs and labels, reduced as compute_loss reduces a batch's."""
        if self.compute_loss_func is not None:
            return self.compute_loss_func
        return functools.partial(model_loss, model)

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
        if self.fsdp_units is None:
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir or self.args.output_dir
        if _internal_call:  # a checkpoint: every rank its slices, in accelerate's sharded format
            save_sharded(self.accelerator, self.model, output_dir)
            if self.args.should_save:
                self.model.config.save_pretrained(output_dir)
            return None
        weights = full_state_dict(self.model)  # every rank takes part in gathering them
        if self.args.should_save:
            self._save(output_dir, state_dict=weights)
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if self.fsdp_units is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        return load_sharded(self.accelerator, self.model, resume_from_checkpoint)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if self.fsdp_units is None:
            return super()._save_optimizer_and_scheduler(output_dir)
        # each rank's state is of its own slices
        torch.save(self.optimizer.state_dict(), os.path.join(output_dir, optimizer_file(self.args.process_index)))
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))
        return None

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if self.fsdp_units is None or checkpoint is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        state = os.path.join(checkpoint, optimizer_file(self.args.process_index))
        if not os.path.isfile(state):
            raise UserError(f"{checkpoint}: no {optimizer_file(self.args.process_index)}; a sharded run resumes "
                            "on as many ranks as saved its optimizer state")
        self.optimizer.load_state_dict(torch.load(state, map_location=self.args.device, weights_only=True))
        self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True))
        return None

    _trajectory_begun = False

    def begin_trajectory(self, step: int) -> None:
        self._trajectory_begun = True
        named = [(n, p) for group in self.zo.param_groups for n, p in zip(group["names"], group["params"])]
        if self.trajectory is not None or self.fsdp_units is not None:  # sharded: every rank joins the gathers
            digest = params_digest((n, whole(p)) for n, p in named)
        if self.trajectory is not None:
            self.trajectory.start(
                step,
                {
                    "params": [n for n, _ in named],
                    "no_decay": self.zo.no_decay,
                    "init_sha256": digest,
                    "optimizer": {**header_fields(self.settings), "seed": self.zo.seed,
                                  "weight_decay": self.zo.defaults["weight_decay"]},
                },
            )

    def record_step(self, record: dict) -> None:
        """Called after every optimizer step with its trajectory record."""
        if self.rows is not None:  # on every rank: it gathers the ranks' rows
            record.update(self.rows.fields())
        if self.trajectory is not None:
            if self.zo.last_first_order:  # before the record that names it
                save_gradients(self.args.output_dir, record["step"], self.zo.last_first_order)
            self.trajectory.append(record)
        self.zo.last_first_order = {}  # not held while the next step's backward allocates its own
        self.nonfinite.count(record["step"], finite=record["g"] is not None)
        if record["g"] is not None:
            self._zo_log["projected_grad"] += record["g"]

    def _get_grad_norm(self, model, grad_norm=None):
        return None  # there is no gradient; the projected gradient is logged instead

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._zo_log["loss_plus"]:
            zo = self._zo_log
            logs["loss_plus"] = sum(zo["loss_plus"]) / len(zo["loss_plus"])
            logs["loss_minus"] = sum(zo["loss_minus"]) / len(zo["loss_minus"])
            if zo["projected_grad"]:
                logs["projected_grad"] = sum(zo["projected_grad"]) / len(zo["projected_grad"])
                logs["projected_grad_abs"] = sum(abs(g) for g in zo["projected_grad"]) / len(zo["projected_grad"])
            logs["nonfinite_steps"] = self.nonfinite.total
            if "comm_bytes" in (self.zo.last_record or {}):
                logs["comm_bytes_per_step"] = self.zo.last_record["comm_bytes"]  # data parallel: all a step sends
            zo["loss_plus"], zo["loss_minus"], zo["projected_grad"] = [], [], []
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
        if self.trajectory is not None:
            self.trajectory.sync()
        save_checkpoint_atomically(self, super()._save_checkpoint, model, trial)


def no_decay_names(named: Iterable[tuple[str, torch.nn.Parameter]], decay_names: Iterable[str]) -> list[str]:
    """The names in `named` (stable names) that weight decay skips: those not among `decay_names`,
    the full names `Trainer.get_decay_parameter_names` gives (HF's rule: biases and norms)."""
    decay = {stable_name(n) for n in decay_names}
    return [n for n, _ in named if n not in decay]


def _first_rows(inputs: dict, rows: int) -> dict:
    """The first `rows` rows of a batch whose tensors all have the same rows; any other batch whole
    (a preference batch with per-pair columns, say)."""
    lengths = {len(v) for v in inputs.values() if torch.is_tensor(v) and v.dim()}
    if len(lengths) != 1:
        return inputs
    return {k: v[:rows] if torch.is_tensor(v) and v.dim() else v for k, v in inputs.items()}


def _without_kv_cache(model, inputs: dict) -> dict:
    """A loss forward needs no KV cache; unasked, transformers keeps every layer's keys and values."""
    if forward_accepts(model, "use_cache"):
        return {**inputs, "use_cache": False}
    return inputs


class _ZOStepHook(TrainerCallback):
    """Connects the Trainer's loop events to the ZO trajectory and non-finite accounting."""

    def __init__(self, trainer: ZOTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        if self.trainer.dual is None:  # else at the first step, once the probe has settled the schedule
            self.trainer.begin_trajectory(state.global_step)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.trainer.zo.rule.first_order:
            self.trainer._average_first_order()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer.record_step(self.trainer.zo.last_record)

    def on_train_end(self, args, state, control, **kwargs):
        if not self.trainer._trajectory_begun:  # no step ran
            self.trainer.begin_trajectory(state.global_step)
        self.trainer.flush()
        if self.trainer.trajectory is not None:
            self.trainer.trajectory.close()

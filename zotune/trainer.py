"""`ZOTrainer`: a `transformers.Trainer` whose optimizer is zeroth-order.

Only narrow hooks are overridden: `create_optimizer` builds `ZOSGD`,
`training_step` runs the ± forwards instead of forward + backward, and `log`
adds the ZO statistics. The training loop, LR schedulers, callbacks,
evaluation, checkpointing and `resume_from_checkpoint` are the Trainer's own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from zotune.errors import UserError
from zotune.models import stable_name, trainable_parameters
from zotune.optim import SCHEDULES, ZOSGD
from zotune.trajectory import TrajectoryWriter, params_digest

PERTURBATIONS = ("gaussian", "rademacher")


class NonFiniteLossError(UserError):
    """Training produced non-finite losses for too many steps in a row (the CLI prints it, no traceback)."""


@dataclass
class ZOConfig(TrainingArguments):
    """`TrainingArguments` plus the zeroth-order settings (all prefixed `zo_`)."""

    zo_eps: float = field(default=1e-3, metadata={"help": "Perturbation scale ε of the ± forwards."})
    zo_num_directions: int = field(
        default=1, metadata={"help": "Random directions q per step; their estimates are averaged."}
    )
    zo_perturbation: str = field(
        default="gaussian", metadata={"help": "Distribution of z: 'gaussian' or 'rademacher' (±1, cheaper)."}
    )
    zo_schedule: str = field(
        default="fused",
        metadata={"help": "'sequential' (MeZO: restore after each − pass) or 'fused' (restore merged into the next pass)."},
    )
    zo_include: list[str] = field(
        default_factory=list, metadata={"help": "Regexes: train only parameters whose stable name matches one."}
    )
    zo_exclude: list[str] = field(
        default_factory=list, metadata={"help": "Regexes: never train parameters whose stable name matches one."}
    )
    zo_max_nonfinite: int = field(
        default=5, metadata={"help": "Stop training after this many steps in a row with a non-finite loss."}
    )
    zo_trajectory: bool = field(
        default=True, metadata={"help": "Append every step to output_dir/zo_trajectory.jsonl (for replay)."}
    )
    max_grad_norm: float = field(default=0.0, metadata={"help": "Unused by ZO: there are no gradients to clip."})

    def __post_init__(self):
        super().__post_init__()
        if self.zo_schedule not in SCHEDULES:
            raise ValueError(f"zo_schedule must be one of {SCHEDULES}, got {self.zo_schedule!r}")
        if self.zo_perturbation not in PERTURBATIONS:
            raise ValueError(f"zo_perturbation must be one of {PERTURBATIONS}, got {self.zo_perturbation!r}")
        if self.zo_eps <= 0 or self.zo_num_directions < 1 or self.zo_max_nonfinite < 1:
            raise ValueError("zo_eps must be > 0, zo_num_directions and zo_max_nonfinite >= 1")


class ZOTrainer(Trainer):
    """A drop-in `Trainer` that trains with SPSA estimates from pairs of forward passes."""

    args: ZOConfig

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, ZOConfig):
            raise TypeError("ZOTrainer needs a ZOConfig, not a plain TrainingArguments")
        self.zo: ZOSGD | None = None
        self._zo_log = {"loss_plus": [], "loss_minus": [], "projected_grad": []}
        self.nonfinite_steps = 0
        self.trajectory = TrajectoryWriter(self.args.output_dir) if self.args.zo_trajectory else None
        self.add_callback(_ZOStepHook(self))

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = model if model is not None else self.model
            named = trainable_parameters(model, self.args.zo_include, self.args.zo_exclude)
            decay = {stable_name(n) for n in self.get_decay_parameter_names(model)}
            # kept as a direct reference: accelerate wraps self.optimizer, and state put on
            # the wrapper would never reach the optimizer that updates the weights
            self.zo = ZOSGD(
                named,
                lr=self.args.learning_rate,
                weight_decay=self.args.weight_decay,
                no_decay=[n for n, _ in named if n not in decay],
                eps=self.args.zo_eps,
                num_directions=self.args.zo_num_directions,
                perturbation=self.args.zo_perturbation,
                schedule=self.args.zo_schedule,
                seed=self.args.seed,
            )
            self.optimizer = self.zo
        return self.optimizer

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        model.eval()  # dropout off: both passes must see the same function
        inputs = self._prepare_inputs(inputs)

        def loss_fn() -> float:
            # a copy: compute_loss pops "labels" from the dict it is given
            return self.compute_loss(model, dict(inputs)).item()

        losses = self.zo.estimate(loss_fn, self.state.global_step)
        mean = sum(lp + lm for lp, lm in losses) / (2 * len(losses))
        self._zo_log["loss_plus"] += [lp for lp, _ in losses]
        self._zo_log["loss_minus"] += [lm for _, lm in losses]
        # the Trainer sums the returned loss over micro-batches of a step
        return torch.tensor(mean / self.current_gradient_accumulation_steps, device=self.args.device)

    def begin_trajectory(self, step: int) -> None:
        if self.trajectory is not None:
            named = [(n, p) for group in self.zo.param_groups for n, p in zip(group["names"], group["params"])]
            self.trajectory.start(
                step,
                {
                    "params": [n for n, _ in named],
                    "no_decay": self.zo.no_decay,
                    "init_sha256": params_digest(named),
                    "optimizer": {
                        "rule": "sgd",
                        "seed": self.zo.seed,
                        "eps": self.zo.eps,
                        "num_directions": self.zo.q,
                        "perturbation": self.zo.kind,
                        "schedule": self.zo.schedule,
                        "weight_decay": self.zo.defaults["weight_decay"],
                    },
                },
            )

    def record_step(self, record: dict) -> None:
        """Called after every optimizer step with its trajectory record."""
        if self.trajectory is not None:
            self.trajectory.append(record)
        if record["g"] is None:
            self.nonfinite_steps += 1
            if self.zo.nonfinite_in_a_row >= self.args.zo_max_nonfinite:
                raise NonFiniteLossError(
                    f"{self.zo.nonfinite_in_a_row} steps in a row had non-finite losses (last at step "
                    f"{record['step']}); lower learning_rate or zo_eps. Nothing was applied for those steps."
                )
        else:
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
            logs["nonfinite_steps"] = self.nonfinite_steps
            zo["loss_plus"], zo["loss_minus"], zo["projected_grad"] = [], [], []
        super().log(logs, start_time)


class _ZOStepHook(TrainerCallback):
    """Connects the Trainer's loop events to the ZO trajectory and non-finite accounting."""

    def __init__(self, trainer: ZOTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.begin_trajectory(state.global_step)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer.record_step(self.trainer.zo.last_record)

    def on_train_end(self, args, state, control, **kwargs):
        if self.trainer.trajectory is not None:
            self.trainer.trajectory.close()

"""The settings of a ZO step, defined once: `ZOSettings`, the recipe's `zo:` section.

Every other place a ZO setting appears derives from this model:

- `ZOConfig`'s `zo_*` fields are generated from its fields (`config_fields`), and
  `ZOConfig.zo_settings()` validates them through it (`from_config`);
- `zotune.preflight` turns a recipe's section into those fields (`to_config`);
- `ZOOptimizer` takes a `ZOSettings` (its defaults are the model's);
- the trajectory header stores the settings a run's steps ran with (`header_fields`), and replay
  rebuilds the model from them;
- the bilevel mode builds its optimizers from the recipe's `zo` section.

So a new setting is one field here (name, type, default, description, validation).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import field
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    WrapValidator,
    field_validator,
    model_validator,
)

from zotune.eps import MAX_EPS, bound_error
from zotune.methods import build_estimator, build_rule, check_compatible
from zotune.objectives import check_name
from zotune.precision import MASTER_WEIGHTS, SCHEDULES
# zotune.noise.KINDS, written out: importing zotune.noise imports torch, which validating a recipe must not
# (tests/test_settings.py holds the two equal)
PERTURBATIONS = ("gaussian", "gaussian4x", "rademacher")
OFFLOADS = ("none", "cpu")
SHARDS = ("none", "fsdp")
TRANSFER_DTYPES = ("bfloat16", "float16")

MethodSpec = str | dict[str, Any]


class Section(BaseModel):
    """A recipe section: an unknown key is an error rather than a silently ignored setting."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def check_schedule(schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")


def _function_or_name(value: Any, handler: Callable) -> Any:
    # a function is for Python callers (ZOConfig(zo_objective=fn)); a recipe gives a name or an import path
    return value if callable(value) else handler(value)


# settings that were removed -> why, and what a recipe that still sets one should do
REMOVED = {
    "lazy_update": "removed on 2026-12-07: folding each update into the next step's perturbed copies saved one read "
    "of the weights, nothing measurable (docs/benchmarks.md), and gave the same numbers as applying it at once, "
    "which every run now does; delete the key",
}


class ZOSettings(Section):
    """How a ZO step runs. The recipe's `zo:` section; `ZOConfig`'s fields `zo_<name>`."""

    rule: MethodSpec = Field(
        "sgd",
        description="Update rule: a registered name (docs/methods.md lists them) or a mapping with `name` and its "
        "settings, e.g. {name: momentum, beta: 0.9}.",
    )
    estimator: MethodSpec = Field(
        "spsa",
        description="Gradient estimator: a registered name (docs/methods.md lists them) or a mapping with `name` and "
        "its settings, e.g. {name: sparse, density: 0.1}. spsa with num_directions > 1 is n-SPSA.",
    )
    eps: float = Field(
        1e-3, gt=0, description=f"Perturbation scale epsilon, below {MAX_EPS:g} (MeZO's 1e-3 is the default); at train "
        "start it must also be below 10x the RMS of the trainable weights (see zotune.eps).",
    )
    num_directions: int = Field(1, ge=1, description="Directions q per step; the update averages them.")
    slice_directions: bool = Field(
        False,
        description="dual with num_directions q >= 2: one forward of the doubled batch for all q directions, "
        "direction k estimated on the k-th of q slices of the batch's rows (MobiZO, arXiv:2409.15520), instead of "
        "q doubled forwards of the whole batch. Trades the data each direction sees (B/q rows) for q times fewer "
        "forwards; the batch size must be a multiple of q.",
    )
    perturbation: Literal[PERTURBATIONS] = Field(
        "gaussian4x",
        description="Distribution of z. gaussian4x: N(0, 1), four elements per Philox call (Triton's tl.randn4x); "
        "gaussian: N(0, 1), one Philox call per element (tl.randn), the default of runs before 2026-12-07 and about "
        "half as fast on a CPU; rademacher: -1 or +1, 128 elements per call. A run's trajectory records its noise, "
        "so replay and resume keep it.",
    )
    schedule: Literal[SCHEDULES] = Field(
        "dual",
        description="dual: one forward of the doubled batch, each module perturbed around its own call; "
        "sequential: MeZO's two forwards; fused: sequential with one noise pass fewer.",
    )
    master_weights: Literal[MASTER_WEIGHTS] = Field(
        "auto",
        description="fp32 master copies of 16-bit trainable weights. auto: only where an in-place schedule "
        "(sequential, fused) displaces them, none under dual (its updates are stochastically rounded); fp32: always "
        "(4 more bytes per 16-bit weight); none: never (in-place schedules then drift, with a warning).",
    )
    offload: Literal[OFFLOADS] = Field(
        "none",
        description="cpu: keep the transformer blocks in CPU memory and stream each one to the compute device "
        "for its forward (trades transfer time for device memory).",
    )
    offload_transfer_dtype: Literal[TRANSFER_DTYPES] | None = Field(
        None,
        description="offload: send blocks in this 16-bit dtype (half the transfer) while the CPU keeps "
        "the full-precision copy.",
    )
    shard: Literal[SHARDS] = Field(
        "none",
        description="fsdp: under torch.distributed (torchrun, accelerate launch), shard every weight across the "
        "ranks with FSDP2's fully_shard, each transformer block a unit: a rank keeps 1/N of the weights and gathers "
        "one unit at a time for its forward (trades an all-gather per unit per forward for device memory). Each "
        "rank perturbs and updates its slice with the z of the whole weight, so the numbers equal one process. "
        "Needs an in-place schedule (fused or sequential) and estimator spsa.",
    )
    max_nonfinite: int = Field(5, ge=1, description="Stop after this many non-finite steps in a row.")
    objective: Annotated[str, AfterValidator(check_name), WrapValidator(_function_or_name)] = Field(
        "loss",
        description="What ZO minimizes: loss (the task's), accuracy or f1 (classification; minimized as "
        "1 - metric on the batch), or a function's import path 'package.module:function' called as "
        "fn(outputs, labels) -> float, lower is better (see zotune.objectives).",
    )

    @field_validator("eps")
    @classmethod
    def _below_weight_scale(cls, eps: float) -> float:
        error = bound_error(eps)
        if error:
            raise ValueError(error)
        return eps

    @field_validator("rule")
    @classmethod
    def _known_rule(cls, spec: MethodSpec) -> MethodSpec:
        build_rule(spec)
        return spec

    @field_validator("estimator")
    @classmethod
    def _known_estimator(cls, spec: MethodSpec) -> MethodSpec:
        build_estimator(spec)
        return spec

    @model_validator(mode="before")
    @classmethod
    def _not_removed(cls, values: Any) -> Any:
        for key in set(REMOVED).intersection(values if isinstance(values, dict) else ()):
            raise ValueError(f"`{key}` was {REMOVED[key]}")
        return values

    @model_validator(mode="after")
    def _compatible(self) -> "ZOSettings":
        check_schedule(self.schedule)
        if self.offload_transfer_dtype is not None and self.offload == "none":
            raise ValueError("`offload_transfer_dtype` needs `offload: cpu`")
        if self.shard == "fsdp" and (self.schedule == "dual" or self.offload != "none"
                                     or not build_estimator(self.estimator).plain):
            raise ValueError("`shard: fsdp` perturbs each rank's slice of the weights in place: it needs `schedule: "
                             f"fused` or `sequential`, `offload: none` and estimator spsa (here {self.schedule!r}, "
                             f"{self.offload!r} and {build_estimator(self.estimator).name!r})")
        if self.slice_directions and (self.schedule != "dual" or self.num_directions < 2):
            raise ValueError("`slice_directions` runs the q directions on slices of one dual forward: it needs "
                             f"`schedule: dual` and `num_directions` >= 2 (here {self.schedule!r} and "
                             f"{self.num_directions})")
        rule = build_rule(self.rule)
        check_compatible(rule, build_estimator(self.estimator), schedule=self.schedule,
                         num_directions=self.num_directions)
        if rule.first_order and (self.objective != "loss" or self.offload != "none"):
            raise ValueError(f"rule {rule.name!r} backpropagates the task's loss through the resident model: it "
                             f"needs `objective: loss` and `offload: none` (here {self.objective!r} and "
                             f"{self.offload!r})")
        return self


# -- ZOConfig's zo_* fields ---------------------------------------------------------------------


def _method_settings() -> list[str]:
    """The settings that name a registered method (rule, estimator): ZOConfig splits each into name and kwargs."""
    return [name for name, info in ZOSettings.model_fields.items() if info.annotation == MethodSpec]


def _plain_type(annotation: Any) -> Any:
    """A field's type without its pydantic validators, for the dataclass (HfArgumentParser reads it)."""
    return get_args(annotation)[0] if get_origin(annotation) is Annotated else annotation


def config_fields() -> list[tuple[str, Any, Any]]:
    """(name, type, dataclass field) of ZOConfig's `zo_*` settings, for `dataclasses.make_dataclass`:
    `zo_<name>` per setting, a method's as `zo_<name>` (its registered name) and `zo_<name>_kwargs`."""
    methods = _method_settings()
    fields = []
    for name, info in ZOSettings.model_fields.items():
        help_ = {"help": info.description}
        if name in methods:
            fields.append((f"zo_{name}", str, field(default=info.default, metadata=help_)))
            fields.append((f"zo_{name}_kwargs", dict | str, field(
                default_factory=dict, metadata={"help": f"Settings of zo_{name}, as a dict or JSON."})))
        else:
            fields.append((f"zo_{name}", _plain_type(info.annotation), field(default=info.default, metadata=help_)))
    return fields


def to_config(settings: ZOSettings) -> dict[str, Any]:
    """`settings` as ZOConfig's `zo_*` keyword arguments."""
    values = {f"zo_{name}": getattr(settings, name) for name in ZOSettings.model_fields}
    for name in _method_settings():
        spec = values[f"zo_{name}"]
        spec = {"name": spec} if isinstance(spec, str) else dict(spec)
        values[f"zo_{name}"], values[f"zo_{name}_kwargs"] = spec.pop("name"), spec
    return values


def from_config(config: Any) -> ZOSettings:
    """The settings of a ZOConfig (`zo_*` attributes), validated; a refusal is a ValueError in zo_* terms."""
    values = {name: getattr(config, f"zo_{name}") for name in ZOSettings.model_fields}
    for name in _method_settings():
        kwargs = getattr(config, f"zo_{name}_kwargs")
        kwargs = json.loads(kwargs) if isinstance(kwargs, str) else kwargs  # from a command line
        values[name] = {"name": values[name], **kwargs} if kwargs else values[name]
    try:
        return ZOSettings(**values)
    except ValidationError as e:
        raise ValueError("; ".join(_in_config_terms(error) for error in e.errors())) from None


def _in_config_terms(error: dict) -> str:
    message = error["msg"].removeprefix("Value error, ")
    message = re.sub(r"`(" + "|".join(ZOSettings.model_fields) + r")\b", r"`zo_\1", message)
    if not error["loc"]:
        return message
    key = str(error["loc"][0])
    # a message that begins with its key (zotune.eps's do) reads as it is, prefixed
    return f"zo_{message}" if message.startswith(key + " ") else f"zo_{key}: {message}"


# -- the trajectory header --------------------------------------------------------------------

# replay measures no loss: the objective's value is in each record, and a function has no JSON form
NOT_IN_HEADER = {"objective"}


def header_fields(settings: ZOSettings) -> dict[str, Any]:
    """The settings as the trajectory header's `optimizer` stores them."""
    return settings.model_dump(exclude=NOT_IN_HEADER)


def from_header(optimizer: dict) -> ZOSettings:
    """The settings a header's `optimizer` recorded; one written before this model (no offload,
    max_nonfinite, objective; earlier still no master_weights, rule or estimator) gets the defaults, and a
    setting since removed (`REMOVED`) is dropped: its runs replay with the same numbers without it."""
    return ZOSettings(**{k: v for k, v in optimizer.items() if k in ZOSettings.model_fields})


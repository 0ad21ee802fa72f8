"""What an update rule and a gradient estimator are to the ZO optimizer (`zotune.optim`).

A step estimates one scalar g_k per direction k from the losses at two points θ + a·z_k and
θ + b·z_k, then updates θ with ĝ = (1/q) Σ_k g_k z_k. The *estimator* decides what z_k is
(plain noise, masked, preconditioned, low-rank) and the offsets (a, b); the *rule* decides
how ĝ moves θ (SGD, momentum, Adam, sign, ...). Neither ever stores z: both regenerate it
from the step's seeds, so a step stays a handful of scalars in the trajectory log.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    import torch

# Method modules import torch inside their functions: validating a recipe (which builds the
# methods' configs) stays light.

Directions = Callable[[int], "torch.Tensor"]  # a direction's seed -> z for the whole parameter


@dataclass(frozen=True)
class Noise:
    """The run's noise, from which a method regenerates any z: its seed and its kind."""

    run_seed: int
    kind: str  # a zotune.noise kind: "gaussian", "gaussian4x" or "rademacher"

    def step_seed(self, step: int) -> int:
        from zotune.noise import step_seed

        return step_seed(self.run_seed, step)


@dataclass(frozen=True)
class Trainable:
    """One trainable parameter: its stable name, the tensor, and its optimizer state."""

    name: str
    param: torch.Tensor
    state: dict


@dataclass(frozen=True)
class StepView:
    """What a rule or an estimator sees of one optimizer step; `zotune.optim` builds it.

    `losses` are the (L_a, L_b) pairs taken so far, micro-batch after micro-batch, q per
    micro-batch. `losses_at`, given to `Rule.choose` only, moves θ to θ + c·z_0 for each c in turn,
    takes the loss of the step's last micro-batch there (the mean over data-parallel ranks; NaN
    when replaying: the moves alone), and returns θ to where it was.
    """

    step: int
    noise: Noise
    lr: float  # of the first parameter group
    params: tuple[Trainable, ...]
    losses: tuple[tuple[float, float], ...] = ()
    losses_at: Callable[[Sequence[float]], list[float]] | None = None

    @property
    def seed(self) -> int:
        return self.noise.step_seed(self.step)


class MethodConfig(BaseModel):
    """A method's settings (recipe: `zo.rule` / `zo.estimator` as a mapping with `name`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class ParamUpdate:
    """One parameter's share of a step's update: θ ← rule(θ, ĝ), ĝ = Σ_k coefs[k]·z(seeds[k]).

    The parameter may still sit at θ + restore·z(seeds[-1]) (the fused schedule leaves it at
    its last − offset); a 16-bit parameter's θ is its fp32 `master`, and it is never displaced.
    """

    param: torch.Tensor
    state: dict
    master: torch.Tensor | None
    seeds: list[int]
    coefs: list[float]
    restore: float
    kind: str
    directions: Directions | None
    lr: float
    wd: float
    offset: int = 0  # of this (sharded) parameter's first element in the whole one: z is that slice
    rounding_seed: int | None = None  # a 16-bit parameter without a master: its stochastic rounding stream
    grad: torch.Tensor | None = None  # its backprop gradient, for a rule that takes one (`Rule.first_order`)

    def z(self, seed: int) -> torch.Tensor:
        from zotune.noise import noise

        if self.directions:
            return self.directions(seed)
        return noise(seed, self.param.numel(), self.kind, self.offset, self.param.device).view(self.param.shape)

    def ghat(self) -> torch.Tensor:
        """ĝ for this parameter, materialised (one parameter at a time)."""
        import torch

        total = torch.zeros(self.param.shape, dtype=torch.float32, device=self.param.device)
        for seed, coef in zip(self.seeds, self.coefs):
            total.add_(self.z(seed), alpha=coef)
        return total

    def kernel_kw(self, directions: Directions | None = None) -> dict:
        """The keyword arguments of a kernel call on this parameter; `directions` replaces z."""
        if directions is not None:
            return {"kind": self.kind, "master": self.master, "directions": directions}
        return {"kind": self.kind, "master": self.master, "directions": self.directions, "offset": self.offset}

    def one_direction(self) -> tuple[int, float, dict]:
        """(seed, coefficient, kernel keywords) that give ĝ to a single-direction kernel: the seed
        itself when there is one direction, else ĝ materialised behind a constant `directions`."""
        if len(self.seeds) == 1:
            return self.seeds[0], self.coefs[0], self.kernel_kw()
        ghat = self.ghat()
        return 0, 1.0, self.kernel_kw(lambda _: ghat)

    def to_theta(self) -> None:
        """Undo the pending displacement, for rules that start from a clean θ."""
        from zotune.kernels import perturb_

        if self.restore and self.master is None:
            perturb_(self.param, self.seeds[-1], self.restore, **{**self.kernel_kw(), "master": None})

    def fp32_state(self, key: str) -> torch.Tensor:
        """A float32 state tensor shaped like the parameter, created as zeros on first use."""
        import torch

        if key not in self.state:
            self.state[key] = torch.zeros(self.param.shape, dtype=torch.float32, device=self.param.device)
        return self.state[key]


class Method:
    """What rules and estimators share: a name, a config, a paper, and their costs.

    `state_copies` is the persistent optimizer state in fp32 copies of the trainable
    parameters (docs/methods.md's table); `extra_forwards` the forwards per step beyond
    the two of SPSA.
    """

    name: ClassVar[str]
    paper: ClassVar[str]
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    state_copies: ClassVar[float] = 0
    extra_forwards: ClassVar[int] = 0

    def __init__(self, config: MethodConfig | None = None):
        self.config = config if config is not None else self.Config()

    def spec(self) -> dict:
        """The name and settings, as recorded in the trajectory header."""
        return {"name": self.name, **self.config.model_dump()}

    def refusal(self, *, schedule: str, num_directions: int) -> str | None:
        """Why this method cannot run with these settings, or None."""
        return None


class Rule(Method):
    """How ĝ moves θ."""

    # its update of a 16-bit weight without a master copy is stochastically rounded
    # (`ParamUpdate.rounding_seed`); a rule without it keeps fp32 masters (zotune.precision)
    stochastic_rounding: ClassVar[bool] = False
    # its update adds the parameters' backprop gradient (`ParamUpdate.grad`); ZOTrainer runs a
    # backward on some of each batch's rows for it (`zotune.first_order`)
    first_order: ClassVar[bool] = False

    # it reads a step's 2q losses as a population of members θ ± c·z_k (es): the estimator's offsets
    # must be antithetic, (c, −c)
    antithetic_population: ClassVar[bool] = False

    def apply(self, u: ParamUpdate) -> None:
        raise NotImplementedError

    def choose(self, view: StepView, g: list[float], recorded: dict | None) -> tuple[list[float] | None, dict]:
        """The projected gradients to apply (None: leave θ as it is), and what to record about
        the choice. `recorded` is the step's trajectory record when replaying."""
        return g, {}


class Estimator(Method):
    """What z_k is, and where the two losses of a direction are taken."""

    plain: ClassVar[bool] = False  # z is the noise itself: the fused kernels regenerate it
    direction_state: ClassVar[tuple[str, ...]] = ()  # state keys `directions` reads (travel when offloading)
    loss_at_theta: ClassVar[bool] = False  # needs L(θ) every micro-batch (one more forward)
    # `update_terms` adds terms in the units of g: a rule that rescales or chooses among the g's cannot take it
    corrects_estimate: ClassVar[bool] = False

    def num_directions(self, sizes: dict[str, int], asked: int) -> int:
        """The directions q per step, given each trainable parameter's element count (in the
        optimizer's order); `asked` is `zo.num_directions`. Called once, before `offsets`."""
        return asked

    def offsets(self, eps: float) -> tuple[float, float]:
        """The coefficients a, b of the two points θ + a·z and θ + b·z; g = (L_a − L_b) / (a − b)."""
        return eps, -eps

    def directions(self, p: Trainable, step: int | None, noise: Noise) -> Directions | None:
        """z for this parameter at `step` as a function of a direction's seed; None for plain noise."""
        return None

    def begin_step(self, view: StepView) -> dict:
        """Called before a step's first forward (and when replaying it); returns what to record."""
        return {}

    def update_terms(self, name: str, step: int, seeds: list[int], coefs: list[float]) -> tuple[list[int], list[float]]:
        """ĝ's terms for parameter `name` at `step`, given the step's directions' seeds and g_k/q (the g's the
        rule chose): an estimator may reweigh them and put terms of its own (seeds of further noise) before
        them (`corrects_estimate`); the step's last direction stays last (a pending restore is along it)."""
        return seeds, coefs

    def end_step(self, view: StepView, record: dict) -> None:
        """Called after a step's update was applied, with its record (also when replaying)."""

"""The zeroth-order step, top to bottom.

For a step with seed s and directions k = 0..q-1 (DESIGN §3):

    g_k = (L(θ + ε z_k) − L(θ − ε z_k)) / (2ε)        one scalar per direction
    θ  ← θ − lr · ((1/q) Σ_k g_k z_k + wd · θ)          MeZO's ZO-SGD

z_k is never stored: every pass over a parameter regenerates it from (step seed, k, parameter
name) with the counter-based noise of `zotune.noise`, inside the kernels of `zotune.kernels`.

Two ways to take the losses at θ + a·z_k and θ + b·z_k (`offsets`: ±ε for two-sided SPSA), one
object each with one interface (`zotune.placement`): out of place (`dual`, the default: modules run
on perturbed copies of their weights made for each call) and in place (`sequential`, `fused`:
MeZO's way, the weights themselves move). `flush()` brings displaced weights back to θ before
anything reads them.

16-bit weights: out of place, they need no fp32 master copy; their updates are rounded
stochastically with the step's rounding stream (direction `ROUNDING` of the step seed, per
name), so an update below half an ulp still moves θ in expectation and replay stays
bit-exact. In place, a 16-bit weight keeps an fp32 master (`zotune.precision`), since +εz −2εz
+εz does not bring it back.

What z is and where the two losses of a direction are taken is the *estimator's* choice
(`zotune.methods.estimators`); how ĝ moves θ is the *rule's* (`zotune.methods.rules`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.distributed as dist

from zotune import precision
from zotune.first_order import gradients_digest
from zotune.fsdp import is_sharded, local_shard
from zotune.methods import (
    Estimator,
    Noise,
    ParamUpdate,
    Rule,
    StepView,
    Trainable,
    build_estimator,
    build_rule,
    check_compatible,
)
from zotune.noise import seed_for, step_seed
from zotune.placement import InPlace, OutOfPlace
from zotune.points import Point, Update  # noqa: F401 - Point is imported from here too
from zotune.settings import REMOVED, SCHEDULES, ZOSettings, check_schedule  # noqa: F401 - SCHEDULES is re-exported

ROUNDING = -1  # the direction index of a step's stochastic-rounding stream: never a perturbation's


def data_parallel() -> bool:
    """Whether this process is one of several torch.distributed ranks (torchrun, accelerate launch)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(rows: list[list[float]]) -> list[list[float]]:
    """The element-wise sum of `rows` over all ranks, in float64 (on the GPU for NCCL)."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    flat = torch.tensor(rows, dtype=torch.float64, device=device)
    dist.all_reduce(flat)
    return flat.tolist()


class ZOOptimizer(torch.optim.Optimizer):
    """Zeroth-order training from pairs of forwards; by default ZO-SGD with SPSA estimates
    (Malladi et al., 2023, "Fine-Tuning Language Models with Just Forward Passes",
    arXiv:2305.17333). `rule` and `estimator` name a registered method (`zotune.methods`), as
    a name or a mapping with `name` and its settings. `master_weights` is `zotune.precision`'s.

    Call `estimate(loss_fn, step)` once per micro-batch; micro-batches of one
    step share its seed and their projected gradients are averaged. `step()`
    then applies the update and returns the step's trajectory record.
    """

    def __init__(
        self,
        named_params: Iterable[tuple[str, torch.nn.Parameter]],
        settings: ZOSettings | None = None,
        *,
        lr: float,
        weight_decay: float = 0.0,
        no_decay: Iterable[str] = (),
        seed: int = 0,
        shards: dict[str, int] | None = None,
        **overrides,
    ):
        """`settings`: how the step runs (default: `ZOSettings()`'s defaults); `overrides`: some of
        them by their `ZOSettings` names, e.g. `schedule="fused"`. The step's own refusals are
        checked here; the limits on what a user may ask (eps's bound) are the model's validation."""
        unknown = sorted(overrides.keys() - ZOSettings.model_fields.keys())
        if unknown:
            removed = "".join(f"; `{key}` was {REMOVED[key]}" for key in unknown if key in REMOVED)
            raise TypeError(f"ZOOptimizer got unknown settings {unknown}; the settings are ZOSettings' fields{removed}")
        s = (settings or ZOSettings.model_construct()).model_copy(update=overrides)
        eps, num_directions, schedule = s.eps, s.num_directions, s.schedule
        check_schedule(schedule)
        self.rule = s.rule if isinstance(s.rule, Rule) else build_rule(s.rule)
        self.estimator = s.estimator if isinstance(s.estimator, Estimator) else build_estimator(s.estimator)
        check_compatible(self.rule, self.estimator, schedule=schedule, num_directions=num_directions)
        # sharded parameters (FSDP-style): each rank holds a flat slice of a parameter, starting at
        # this element of the whole; it perturbs and updates only that slice, with the whole's z
        self.shards = dict(shards or {})
        named = list(named_params)
        # FSDP2's parameters (DTensors) by name: known once here, asked on every pass over a weight (`held`)
        self.dtensors = {n for n, p in named if is_sharded(p)}
        if (self.shards or self.dtensors) and (not self.estimator.plain or schedule == "dual"):
            raise ValueError("sharded parameters need estimator 'spsa' and an in-place schedule (sequential or fused):"
                             " a module runs on whole parameters")
        num_directions = self.estimator.num_directions({n: p.numel() for n, p in named}, num_directions)
        self.offsets = self.estimator.offsets(eps)
        no_decay = set(no_decay)
        groups = [
            {"names": [n for n, _ in named if n not in no_decay], "weight_decay": weight_decay},
            {"names": [n for n, _ in named if n in no_decay], "weight_decay": 0.0},
        ]
        self.no_decay = groups[1]["names"]
        by_name = dict(named)
        for group in groups:
            group["params"] = [by_name[n] for n in group["names"]]
        super().__init__([g for g in groups if g["params"]], {"lr": lr, "weight_decay": weight_decay})
        self.eps, self.q, self.kind, self.schedule, self.seed = eps, num_directions, s.perturbation, schedule, seed
        self.master_weights = s.master_weights
        self.slice_directions = s.slice_directions
        # set by a trainer that gives every rank the same batch (zotune.reward): under torch.distributed
        # each rank then measures only its share of the directions and the ranks exchange their pairs
        self.directions_split_across_ranks = False
        self._keep_masters(named)
        self.last_record: dict | None = None
        self.last_first_order: dict[str, torch.Tensor] = {}  # the backprop gradients the last step added
        self.round_trip_checked = False
        self._reset_step()

    def _keep_masters(self, named: list[tuple[str, torch.nn.Parameter]]) -> None:
        rounds = self.rule.stochastic_rounding
        for name, p in named:
            refusal = precision.refusal(self.master_weights, p.dtype, self.rule.name, rounds)
            if refusal:
                raise ValueError(refusal)
            if (precision.keeps_master(self.master_weights, self.schedule, p.dtype, rounds)
                    and "master" not in self.state[p]):
                self.state[p]["master"] = self.held(name, p)[0].float().clone()
        drifts = any(precision.is_half(p.dtype) and "master" not in self.state[p] for _, p in named)
        if drifts and self.schedule in precision.IN_PLACE_SCHEDULES:
            warnings.warn(precision.DRIFT_WARNING.format(schedule=self.schedule), stacklevel=3)

    def run_in_place(self, schedule: str = "fused") -> None:
        """Switch to an in-place schedule before the first step (something reads the weights outside
        the modules that own them); 16-bit weights get the masters that needs under the policy."""
        if schedule not in precision.IN_PLACE_SCHEDULES or self.current_step is not None:
            raise ValueError(f"run_in_place({schedule!r}) needs an in-place schedule, before the first step")
        self.flush()
        self.schedule, self.slice_directions = schedule, False
        self._keep_masters([(name, p) for name, p, _ in self.named_params()])

    @property
    def schedule(self) -> str:
        return self._schedule

    @schedule.setter
    def schedule(self, name: str) -> None:
        self._schedule = name
        self.placement = OutOfPlace(self) if name == "dual" else InPlace(self, name)

    @property
    def out_of_place(self) -> bool:
        return isinstance(self.placement, OutOfPlace)

    def _reset_step(self) -> None:
        self.current_step: int | None = None
        self.step_losses: list[tuple[float, float]] = []  # (L at offset a, L at offset b) per direction
        self.losses_at_theta: list[float] = []
        self._weights: list[float] = []  # per micro-batch: the examples or tokens its losses average over
        self._notes: dict = {}  # what the estimator recorded when the step began
        self.last_loss_fn: Callable | None = None

    @property
    def micro_batches_estimated(self) -> int:
        """The micro-batches of the current step estimated so far (during `estimate`: the index of the one it runs)."""
        return len(self._weights)

    def named_params(self) -> Iterable[tuple[str, torch.nn.Parameter, dict]]:
        for group in self.param_groups:
            for name, p in zip(group["names"], group["params"]):
                yield name, p, group

    # -- what the methods see of a step --------------------------------------------------------

    def _view(self, step: int, losses_at: Callable[[Sequence[float]], list[float]] | None = None) -> StepView:
        """All that a rule or an estimator gets to see of `step` (`zotune.methods.base.StepView`)."""
        return StepView(step, Noise(self.seed, self.kind), self.param_groups[0]["lr"],
                        tuple(Trainable(name, p, self.state[p]) for name, p, _ in self.named_params()),
                        tuple(self.step_losses), losses_at)

    def _losses_at(self, step: int, measure: bool) -> Callable[[Sequence[float]], list[float]]:
        """`StepView.losses_at`: the step's last micro-batch (`measure`) or the moves alone (replay)."""
        def losses_at(coefs: Sequence[float]) -> list[float]:
            s, loss_fn = step_seed(self.seed, step), self.last_loss_fn if measure else None
            losses = []
            for coef in coefs:
                self.placement.move(Point(s, 0, coef))
                losses.append(self.global_loss(loss_fn()) if loss_fn is not None else math.nan)
            self.placement.move(None)
            return losses

        return losses_at

    def kernel_kw(self, name: str, p: torch.nn.Parameter, step: int | None) -> dict:
        directions = self.estimator.directions(Trainable(name, p, self.state[p]), step, Noise(self.seed, self.kind))
        return {"kind": self.kind, "directions": directions, "offset": self.held(name, p)[1]}

    def held(self, name: str, p: torch.nn.Parameter) -> tuple[torch.Tensor, int]:
        """The elements of `p` this process holds and where the first sits in the whole weight (flat
        index): all of it at 0, a slice at its `shards` offset, or an FSDP2 DTensor's local shard."""
        if name in self.dtensors:
            return local_shard(p)
        return p.data, self.shards.get(name, 0)

    def rounding_seed(self, p: torch.nn.Parameter, name: str, step: int) -> int | None:
        """The seed of `p`'s stochastic rounding at `step`: 16-bit weights without a master only."""
        if not precision.is_half(p.dtype) or "master" in self.state[p]:
            return None
        return seed_for(step_seed(self.seed, step), ROUNDING, name)

    # -- updates ---------------------------------------------------------------------------

    def update_param(self, name: str, p: torch.nn.Parameter, update: Update, restore: float = 0.0) -> None:
        """θ ← rule(θ, ĝ) for one parameter; in place it may still sit at θ + restore·z_{q−1}."""
        s = step_seed(self.seed, update.step)
        kw = self.kernel_kw(name, p, update.step)
        q = len(update.g)
        seeds, coefs = self.estimator.update_terms(name, update.step, [seed_for(s, k, name) for k in range(q)],
                                                   [gk / q for gk in update.g])
        self.rule.apply(ParamUpdate(self.held(name, p)[0], self.state[p], self.state[p].get("master"),
                                    seeds, coefs, restore,
                                    self.kind, kw["directions"], update.lr, update.wd, kw["offset"],
                                    self.rounding_seed(p, name, update.step),
                                    p.grad if self.rule.first_order else None))

    def flush(self) -> bool:
        """Bring every parameter to θ with all updates applied (before anything reads the weights).
        Returns whether there was anything to do."""
        return self.placement.flush()

    def _perturbation_passes(self, step: int, loss_fn: Callable | None) -> list:
        """The pairs of one micro-batch, as the schedule takes them (`zotune.placement`): `loss_fn()`
        in place, `loss_fn(s, k)` out of place; `loss_fn=None` replays the moves without forwards.
        An estimator that needs L(θ) (in place only) gets it first."""
        if self.estimator.loss_at_theta:
            self.placement.move(None)
            self.losses_at_theta.append(loss_fn() if loss_fn else math.nan)
        if not (self._splits_directions() and loss_fn):
            return self.placement.passes(step, loss_fn, range(self.q))
        own, world = self._own_directions(), dist.get_world_size()
        pairs = self.placement.passes(step, loss_fn, own)
        gathered = [None] * world
        dist.all_gather_object(gathered, [pairs[k] for k in own])
        return [gathered[k % world][k // world] for k in range(self.q)]

    def _own_directions(self) -> range:
        """The directions this rank measures when the ranks share them out: k ≡ rank (mod world size)."""
        return range(dist.get_rank(), self.q, dist.get_world_size())

    def _splits_directions(self) -> bool:
        """Whether the ranks share out the directions of one batch (else each runs all of them on its shard)."""
        return self.directions_split_across_ranks and data_parallel()

    # -- the public step ------------------------------------------------------------

    @torch.no_grad()
    def estimate(self, loss_fn: Callable, step: int, weight: float = 1.0) -> list[tuple[float, float]]:
        """Run the ± forwards of one micro-batch and keep its losses. Returns the (L+, L−) pairs.

        `loss_fn` is called as described in `_perturbation_passes` for this schedule. `weight`
        is what its loss is a mean over (examples or tokens): micro-batches, and data-parallel
        ranks, are averaged with these weights, so the step's g is that of one batch of them all."""
        if self.current_step not in (None, step):
            raise RuntimeError(f"estimate() for step {step} while step {self.current_step} is not applied yet")
        if self.current_step is None:
            self.current_step = step
            self._notes = self.estimator.begin_step(self._view(step))
            if not self.round_trip_checked and not self.out_of_place:
                self.round_trip_checked = True
                self.placement.check_round_trip(step)
        self.last_loss_fn, self.last_weight = loss_fn, weight
        losses = self._perturbation_passes(step, loss_fn)
        self.step_losses.extend(losses)
        self._weights.append(float(weight))
        return losses

    @torch.no_grad()
    def step(self, closure=None) -> dict:
        """Apply the averaged projected gradient (or skip a non-finite step) and return its record."""
        if self.current_step is None:
            raise RuntimeError("step() called before estimate()")
        micro_batches = len(self._weights)
        comm_bytes = self._reduce_across_ranks()
        a, b = self.offsets
        g = [sum(w * (la - lb) / (a - b) for w, (la, lb) in zip(self._weights, self.step_losses[k::self.q]))
             / sum(self._weights) for k in range(self.q)]
        first_order = self._first_order_grads()
        finite = all(math.isfinite(v) for v in g) and all(bool(t.isfinite().all()) for t in first_order.values())
        choice = {}
        if finite:
            step = self.current_step
            applied, choice = self.rule.choose(self._view(step, self._losses_at(step, measure=True)), g, None)
            if applied is not None:
                self.placement.apply(applied, self.current_step)
            else:  # the rule's choice (fzoo, es: the losses did not spread; conservative: θ was best)
                choice["skipped"] = True
        else:
            self.flush()
        record = {
            "step": self.current_step,
            "seed": step_seed(self.seed, self.current_step),
            "q": self.q,
            "g": g if finite else None,
            "lr": self.param_groups[0]["lr"],
            "wd": self.defaults["weight_decay"],
            "eps": self.eps,
            "rule": self.rule.name,
            "estimator": self.estimator.name,
            "perturbation": self.kind,
            "schedule": self.schedule,
            "master_weights": self.master_weights,
            "micro_batches": micro_batches,
            "loss_plus": [la for la, _ in self.step_losses],
            "loss_minus": [lb for _, lb in self.step_losses],
            **self._notes,
            **choice,
        }
        if self.estimator.loss_at_theta:
            record["loss_zero"] = self.losses_at_theta
        if first_order:  # replay needs g¹ itself: the caller saves `last_first_order` (zotune.first_order)
            record["first_order_sha256"] = gradients_digest(first_order)
        self.last_first_order = first_order
        if comm_bytes:
            record["comm_bytes"] = comm_bytes
        if finite:
            self.estimator.end_step(self._view(self.current_step), record)
        self._reset_step()
        self.last_record = record
        return record

    def _first_order_grads(self) -> dict[str, torch.Tensor]:
        """The backprop gradients a first-order rule adds to this step (`Rule.first_order`), by name."""
        if not self.rule.first_order:
            return {}
        if data_parallel():
            raise RuntimeError(f"rule {self.rule.name!r} does not average its first-order gradient across ranks: "
                               "run it in one process")
        return {name: p.grad for name, p, _ in self.named_params() if p.grad is not None}

    # -- data parallel: a step's estimate is a few scalars per micro-batch ------------------

    def _reduce_across_ranks(self) -> int:
        """Under torch.distributed, replace this rank's losses of the step by the weighted mean over
        all ranks (each rank ran its shard of every micro-batch), and the weights by their totals,
        so every rank computes the same g and applies the same update. Returns the bytes this rank
        sent (0 in a single process)."""
        if not data_parallel():
            return 0
        if self._splits_directions():  # every rank has every pair already (_perturbation_passes): it sent its own
            return len(self._weights) * len(self._own_directions()) * 2 * 8  # per micro-batch, (L_a, L_b) float64
        rows = []
        for m, w in enumerate(self._weights):
            values = [v for pair in self.step_losses[m * self.q:(m + 1) * self.q] for v in pair]
            values += self.losses_at_theta[m:m + 1]
            rows.append([w * v if w else 0.0 for v in values] + [w])  # an empty shard adds nothing
        reduced = all_reduce_sum(rows)
        self._weights = [row[-1] for row in reduced]
        means = [[v / row[-1] for v in row[:-1]] for row in reduced]
        self.step_losses = [(row[2 * k], row[2 * k + 1]) for row in means for k in range(self.q)]
        if self.estimator.loss_at_theta:
            self.losses_at_theta = [row[-1] for row in means]
        return sum(len(row) for row in rows) * 8  # float64

    def global_loss(self, loss: float) -> float:
        """A loss this rank measured on its shard of the step's last micro-batch, as the mean over
        all ranks' shards (the value itself in a single process). For rules that take extra forwards."""
        if not data_parallel() or self._splits_directions():  # the whole batch on every rank
            return loss
        w = self.last_weight
        [[total, weight]] = all_reduce_sum([[w * loss if w else 0.0, w]])
        return total / weight

    @torch.no_grad()
    def measure(self, step: int, loss_fn: Callable, *, eps: float | None = None, seed: int | None = None,
                directions: int | None = None) -> list:
        """What `loss_fn(s, k)` returns for k < `directions` (default: the step's q) at the current θ,
        which stays untouched: it runs the model on perturbed copies (`zotune.dual`), as the dual
        schedule does, whatever schedule the run trained with, at the offsets of `eps` (default: the
        run's) along the z_k of `seed` (default: `step`'s). Nothing is kept for an update; replaying the
        step afterwards is unaffected. For attribution (`zotune.influence`)."""
        self.flush()
        saved = self.schedule, self.offsets
        self.schedule, self.current_step = "dual", step
        if eps is not None:
            self.offsets = self.estimator.offsets(eps)
        try:
            self.estimator.begin_step(self._view(step))
            s = step_seed(self.seed, step) if seed is None else seed
            return [loss_fn(s, k) for k in range(self.q if directions is None else directions)]
        finally:
            self.schedule, self.offsets = saved
            self._reset_step()

    @torch.no_grad()
    def replay(self, record: dict, first_order: dict[str, torch.Tensor] | None = None) -> None:
        """Repeat a recorded step without forwards: θ ends bit-equal to training's.

        Out of place, a step is its update alone (so is one logged with the lazy update of
        runs before 2026-12-07, which folded it into the next perturbed copy with the same numbers). In place,
        the perturbation passes are repeated too: +εz −2εz +εz may leave an ulp behind.
        `first_order`: the step's saved backprop gradients by name, for a first-order rule
        (`zotune.first_order.load_gradients`)."""
        for name, p, _ in self.named_params():
            grad = (first_order or {}).get(name)
            p.grad = None if grad is None else grad.to(p.device)
        for group in self.param_groups:
            group["lr"] = record["lr"]
        self.schedule = record["schedule"]  # each record says how its step ran
        step = self.current_step = record["step"]
        self.estimator.begin_step(self._view(step))
        for _ in range(record["micro_batches"]):
            self._perturbation_passes(step, None)
        if record["g"] is not None:
            applied, _ = self.rule.choose(self._view(step, self._losses_at(step, measure=False)), record["g"], record)
            if applied is not None:
                self.placement.apply(applied, step)
            self.estimator.end_step(self._view(step), record)
        else:
            self.flush()
        for p in (p for _, p, _ in self.named_params()):
            p.grad = None
        self._reset_step()

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts floating state to the parameter's dtype on load; ours keeps its own (the fp32
        # masters of 16-bit weights, the rules' moments, the Hessian estimate)
        saved = {i: {k: v for k, v in s.items() if torch.is_tensor(v)} for i, s in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for i, tensors in saved.items():
            param = params[int(i)]
            self.state[param].update({k: v.to(param.device) for k, v in tensors.items()})

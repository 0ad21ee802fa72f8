"""The zeroth-order step, top to bottom.

For a step with seed s and directions k = 0..q-1 (DESIGN §3):

    g_k = (L(θ + ε z_k) − L(θ − ε z_k)) / (2ε)        one scalar per direction
    θ  ← θ − lr · ((1/q) Σ_k g_k z_k + wd · θ)          MeZO's ZO-SGD

z_k is never stored: every pass over the parameters regenerates it from
(step seed, k, parameter name) with the counter-based noise of `zotune.noise`,
inside the in-place kernels of `zotune.kernels`.

The weights only ever sit at θ or at θ + c·z_k for one (seed, k, c) term, the
*displacement*. Every pass over the parameters moves them from one
displacement to the next, optionally applying the update to θ on the way:

    sequential (MeZO):  θ → θ+εz_k → θ−εz_k → θ per direction, then update
    fused:              the restore from θ−εz_k is deferred and merged into the
                        next pass (the next +ε with `lazy_update_and_perturb_`,
                        or the update with `restore_and_update_`): 3 noise
                        draws a step instead of 4.

Both give the same numbers: every parameter sees the same float operations in
the same order, only the number of times z is regenerated differs.

    dual (default):     one forward of the doubled batch; `zotune.dual` moves each
                        module's weights to +εz_k and −εz_k around its own call
                        (`touch`), so each weight is regenerated twice per
                        direction, then the update pass. Same float operations as
                        fused for a weight used once per forward; a tied weight is
                        moved around each use (its name fixes its z) and updated once.
    dual, lazy_update:  the update is owed, not applied: each weight applies it in
                        its first move of the next step (`lazy_update_and_perturb_`),
                        and `flush()` settles every owed update before anything reads
                        the weights (evaluation, saving, the end of training).

What z is and where the two losses of a direction are taken is the *estimator's* choice
(`zotune.methods.estimators`: plain SPSA, one-sided, sparse masks, Hessian-preconditioned,
low-rank); how ĝ moves θ is the *rule's* (`zotune.methods.rules`: SGD, momentum, Adam, sign,
conservative). The passes below are the same for all of them.

16-bit parameters keep an fp32 master copy of θ in the optimizer state: the
working copy is written as round(master + displacement), so a restore is exact
and the update accumulates at full precision. fp32 parameters are moved in
place; +εz −2εz +εz may drift by an ulp, which is why `replay` repeats the
perturbation passes rather than only the updates.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist

from zotune.kernels import lazy_update_and_perturb_, perturb_
from zotune.methods import Estimator, ParamUpdate, Rule, build_estimator, build_rule, check_compatible
from zotune.noise import seed_for, step_seed

Term = tuple[int, int, float]  # (step seed, direction k, coefficient of z_k)
Update = tuple[list[float], int, float, float]  # (g, step, lr, weight decay)
SCHEDULES = ("dual", "sequential", "fused")


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
    a name or a mapping with `name` and its settings.

    Call `estimate(loss_fn, step)` once per micro-batch; micro-batches of one
    step share its seed and their projected gradients are averaged. `step()`
    then applies the update and returns the step's trajectory record.
    """

    def __init__(
        self,
        named_params: Iterable[tuple[str, torch.nn.Parameter]],
        *,
        lr: float,
        weight_decay: float = 0.0,
        no_decay: Iterable[str] = (),
        eps: float = 1e-3,
        num_directions: int = 1,
        perturbation: str = "gaussian",
        schedule: str = "fused",
        lazy_update: bool = False,
        rule: Rule | str | dict = "sgd",
        estimator: Estimator | str | dict = "spsa",
        seed: int = 0,
        shards: dict[str, int] | None = None,
    ):
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if lazy_update and schedule != "dual":
            raise ValueError("lazy_update needs the dual schedule")
        self.rule = rule if isinstance(rule, Rule) else build_rule(rule)
        self.estimator = estimator if isinstance(estimator, Estimator) else build_estimator(estimator)
        check_compatible(self.rule, self.estimator, schedule=schedule, lazy_update=lazy_update,
                         num_directions=num_directions)
        self.offsets = self.estimator.offsets(eps)
        # sharded parameters (FSDP-style): each rank holds a flat slice of a parameter, starting at
        # this element of the whole; it perturbs and updates only that slice, with the whole's z
        self.shards = dict(shards or {})
        if self.shards and not self.estimator.plain:
            raise ValueError(f"estimator {self.estimator.name!r} builds whole-parameter directions; sharded "
                             "parameters need estimator 'spsa'")
        named = list(named_params)
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
        self.eps, self.q, self.kind, self.schedule, self.seed = eps, num_directions, perturbation, schedule, seed
        self.lazy_update = lazy_update
        for _, p in named:
            if p.dtype in (torch.float16, torch.bfloat16):
                self.state[p]["master"] = p.detach().float().clone()
        self.nonfinite_in_a_row = 0
        self.last_record: dict | None = None
        self._flushed = self._flushed_before = False
        self._reset_step()

    def _reset_step(self) -> None:
        self._step: int | None = None
        self.forward_uses: list[dict[str, int]] = []
        self.step_losses: list[tuple[float, float]] = []  # (L at offset a, L at offset b) per direction
        self._losses_at_theta: list[float] = []
        self._weights: list[float] = []  # per micro-batch: the examples or tokens its losses average over
        self._notes: dict = {}  # what the estimator recorded when the step began
        self.last_loss_fn: Callable | None = None

    # -- the passes over the parameters ---------------------------------------------

    def named_params(self) -> Iterable[tuple[str, torch.nn.Parameter, dict]]:
        for group in self.param_groups:
            for name, p in zip(group["names"], group["params"]):
                yield name, p, group

    def _update_of(self, group: dict, g: list[float], step: int) -> Update:
        return g, step, group["lr"], group["weight_decay"]

    def move(self, to: Term | None, g: list[float] | None = None, step: int | None = None) -> None:
        """One pass over every parameter: to displacement `to`, applying the update (g, step) on the way."""
        for name, p, group in self.named_params():
            self._move_param(name, p, to, None if g is None else self._update_of(group, g, step))

    def _move_param(self, name: str, p: torch.nn.Parameter, to: Term | None, update: Update | None = None) -> None:
        """Take one parameter from its displacement to `to`, applying `update` to θ on the way.

        Each call below is one in-place kernel that regenerates its z (zotune.kernels), or, for
        estimators with structured directions, z = directions(seed).
        """
        state = self.state[p]
        master = state.get("master")
        pending = state.get("at") if master is None else None  # a master copy is never displaced
        directions = self.estimator.directions(name, p, state, self._step if update is None else update[1], self)
        kw = {"kind": self.kind, "directions": directions, "offset": self.shards.get(name, 0)}
        if update is not None:
            g, step, lr, wd = update
            s, q = step_seed(self.seed, step), len(g)
            restore = -pending[2] if pending is not None else 0.0
            if self.lazy_update and q == 1 and to is not None:  # the update rides on the next +ε pass
                decay = 1.0 - lr * wd
                lazy_update_and_perturb_(p.data, seed_for(s, 0, name), restore * decay - lr * g[0],
                                         seed_for(*to[:2], name), to[2], decay=decay, master=master, **kw)
                state["at"] = to
                return
            seeds = [seed_for(s, k, name) for k in range(q)]
            self.rule.apply(ParamUpdate(p.data, state, master, seeds, [gk / q for gk in g], restore, self.kind,
                                        directions, lr, wd, kw["offset"]))
            pending = None
        if pending is not None and to is not None and pending[:2] == to[:2]:
            perturb_(p.data, seed_for(*to[:2], name), to[2] - pending[2], **kw)
        elif pending is not None and to is not None:
            lazy_update_and_perturb_(p.data, seed_for(*pending[:2], name), -pending[2], seed_for(*to[:2], name), to[2],
                                     **kw)
        elif pending is not None:
            perturb_(p.data, seed_for(*pending[:2], name), -pending[2], **kw)
        elif to is not None:
            perturb_(p.data, seed_for(*to[:2], name), to[2], master=master, **kw)
        elif master is not None:
            p.data.copy_(master)
        state["at"] = to

    def touch(self, params: list[tuple[str, torch.nn.Parameter]], to: Term) -> None:
        """dual: move one module's parameters to `to`, first applying any update they still owe."""
        for name, p in params:
            state = self.state[p]
            if state.get("at") != to or "owed" in state:
                self._move_param(name, p, to, state.pop("owed", None))
                state["moves"] = state.get("moves", 0) + 1

    def discard(self, params: list[torch.nn.Parameter]) -> None:
        """The displaced copies of `params` were dropped (16-bit offload transfer): their weights are at θ."""
        for p in params:
            self.state[p]["at"] = None

    def flush(self) -> bool:
        """Bring every parameter to θ with all updates applied (before anything reads the weights).

        Returns whether there was anything to do."""
        dirty = False
        for name, p, _ in self.named_params():
            state = self.state[p]
            if "owed" in state or state.get("at") is not None:
                self._move_param(name, p, None, state.pop("owed", None))
                dirty = True
        self._flushed = self._flushed or dirty
        return dirty

    def _perturbation_passes(self, step: int, loss_fn: Callable | None, uses: list[dict] | None = None) -> list:
        """The ± passes of one micro-batch, one direction after the other.

        sequential / fused: `loss_fn()` is the loss at the current weights, and the
        weights are moved around it, to θ + a·z_k and θ + b·z_k (`offsets`: ±ε for
        two-sided SPSA). dual: `loss_fn(s, k)` runs one forward of the doubled batch
        that returns (L_a, L_b); the engine moves each module's weights around its own
        call (`touch`). `loss_fn=None` replays the moves without forwards; for dual,
        `uses` then says how often each weight was touched.
        """
        s = step_seed(self.seed, step)
        a, b = self.offsets
        if self.estimator.loss_at_theta:
            self.move(None)
            self._losses_at_theta.append(loss_fn() if loss_fn else math.nan)
        losses = []
        for k in range(self.q):
            if self.schedule == "dual":
                losses.append(loss_fn(s, k) if loss_fn else self._replay_touches(s, k, uses.pop(0)))
                self.forward_uses.append(self._collect_uses())
                continue
            self.move((s, k, a))
            loss_a = loss_fn() if loss_fn else math.nan
            self.move((s, k, b))
            loss_b = loss_fn() if loss_fn else math.nan
            if self.schedule == "sequential":
                self.move(None)
            losses.append((loss_a, loss_b))
        return losses

    def _collect_uses(self) -> dict[str, int]:
        """dual: the weights a forward touched a number of times other than once (tied, shared, unused)."""
        uses = {}
        for name, p, _ in self.named_params():
            moves = self.state[p].pop("moves", 0)
            if moves != 2:
                uses[name] = moves // 2
        return uses

    def _replay_touches(self, s: int, k: int, uses: dict[str, int]) -> tuple[float, float]:
        for name, p, _ in self.named_params():
            for _ in range(uses.get(name, 1)):
                for offset in self.offsets:
                    self.touch([(name, p)], (s, k, offset))
        return math.nan, math.nan

    def _apply(self, g: list[float], step: int) -> None:
        """The update of a step, now or, with `lazy_update`, owed until each weight's next touch."""
        if not self.lazy_update:
            self.move(None, g, step)
            return
        for name, p, group in self.named_params():
            state = self.state[p]
            if "owed" in state:  # not touched since its previous update
                self._move_param(name, p, None, state.pop("owed"))
            state["owed"] = self._update_of(group, g, step)

    # -- the public step ------------------------------------------------------------

    @torch.no_grad()
    def estimate(self, loss_fn: Callable, step: int, weight: float = 1.0) -> list[tuple[float, float]]:
        """Run the ± forwards of one micro-batch and keep its losses. Returns the (L+, L−) pairs.

        `loss_fn` is called as described in `_perturbation_passes` for this schedule. `weight`
        is what its loss is a mean over (examples or tokens): micro-batches, and data-parallel
        ranks, are averaged with these weights, so the step's g is that of one batch of them all."""
        if self._step not in (None, step):
            raise RuntimeError(f"estimate() for step {step} while step {self._step} is not applied yet")
        if self._step is None:
            self._flushed_before, self._flushed = self._flushed, False
            self._step = step
            self._notes = self.estimator.begin_step(self, step)
        self.last_loss_fn, self.last_weight = loss_fn, weight
        losses = self._perturbation_passes(step, loss_fn)
        self.step_losses.extend(losses)
        self._weights.append(float(weight))
        return losses

    @torch.no_grad()
    def step(self, closure=None) -> dict:
        """Apply the averaged projected gradient (or skip a non-finite step) and return its record."""
        if self._step is None:
            raise RuntimeError("step() called before estimate()")
        micro_batches = len(self._weights)
        comm_bytes = self._reduce_across_ranks()
        a, b = self.offsets
        g = [sum(w * (la - lb) / (a - b) for w, (la, lb) in zip(self._weights, self.step_losses[k::self.q]))
             / sum(self._weights) for k in range(self.q)]
        finite = all(math.isfinite(v) for v in g)
        choice = {}
        if finite:
            applied, choice = self.rule.choose(self, g, self._step, None)
            if applied is not None:
                self._apply(applied, self._step)
        else:
            self.flush()
        self.nonfinite_in_a_row = 0 if finite else self.nonfinite_in_a_row + 1
        record = {
            "step": self._step,
            "seed": step_seed(self.seed, self._step),
            "q": self.q,
            "g": g if finite else None,
            "lr": self.param_groups[0]["lr"],
            "wd": self.defaults["weight_decay"],
            "eps": self.eps,
            "rule": self.rule.name,
            "estimator": self.estimator.name,
            "perturbation": self.kind,
            "schedule": self.schedule,
            "micro_batches": micro_batches,
            "loss_plus": [la for la, _ in self.step_losses],
            "loss_minus": [lb for _, lb in self.step_losses],
            **self._notes,
            **choice,
        }
        if self.estimator.loss_at_theta:
            record["loss_zero"] = self._losses_at_theta
        if comm_bytes:
            record["comm_bytes"] = comm_bytes
        if self.schedule == "dual":
            record.update(lazy_update=self.lazy_update, flushed_before=self._flushed_before, uses=self.forward_uses)
        if finite:
            self.estimator.end_step(self, self._step, record)
        self._reset_step()
        self.last_record = record
        return record

    # -- data parallel: a step's estimate is a few scalars per micro-batch ------------------

    def _reduce_across_ranks(self) -> int:
        """Under torch.distributed, replace this rank's losses of the step by the weighted mean over
        all ranks (each rank ran its shard of every micro-batch), and the weights by their totals,
        so every rank computes the same g and applies the same update. Returns the bytes this rank
        sent (0 in a single process)."""
        if not data_parallel():
            return 0
        rows = []
        for m, w in enumerate(self._weights):
            values = [v for pair in self.step_losses[m * self.q:(m + 1) * self.q] for v in pair]
            values += self._losses_at_theta[m:m + 1]
            rows.append([w * v if w else 0.0 for v in values] + [w])  # an empty shard adds nothing
        reduced = all_reduce_sum(rows)
        self._weights = [row[-1] for row in reduced]
        means = [[v / row[-1] for v in row[:-1]] for row in reduced]
        self.step_losses = [(row[2 * k], row[2 * k + 1]) for row in means for k in range(self.q)]
        if self.estimator.loss_at_theta:
            self._losses_at_theta = [row[-1] for row in means]
        return sum(len(row) for row in rows) * 8  # float64

    def global_loss(self, loss: float) -> float:
        """A loss this rank measured on its shard of the step's last micro-batch, as the mean over
        all ranks' shards (the value itself in a single process). For rules that take extra forwards."""
        if not data_parallel():
            return loss
        w = self.last_weight
        [[total, weight]] = all_reduce_sum([[w * loss if w else 0.0, w]])
        return total / weight

    @torch.no_grad()
    def replay(self, record: dict) -> None:
        """Repeat a recorded step's passes, without forwards: θ ends bit-equal to training's."""
        for group in self.param_groups:
            group["lr"] = record["lr"]
        # a dual run that fell back records its steps as fused
        self.schedule, self.lazy_update = record["schedule"], record.get("lazy_update", False)
        if record.get("flushed_before"):
            self.flush()
        step = self._step = record["step"]
        self.estimator.begin_step(self, step)
        uses = list(record.get("uses", []))
        for _ in range(record["micro_batches"]):
            self._perturbation_passes(step, None, uses)
        if record["g"] is not None:
            applied, _ = self.rule.choose(self, record["g"], step, record)
            if applied is not None:
                self._apply(applied, step)
            self.estimator.end_step(self, step, record)
        else:
            self.flush()
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

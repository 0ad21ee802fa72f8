"""Where a ZO step takes its losses: the two schedules of `ZOOptimizer`, one interface.

    InPlace (sequential, fused, MeZO's way): the weights themselves move,
        θ → θ+a·z_k → θ+b·z_k → θ, then the update (`move`); fused merges the last restore into
        the update pass. The reference the tests compare the out-of-place schedule with.
    OutOfPlace (dual): θ never moves except by its update. `zotune.dual` runs each module that
        owns trainable parameters on perturbed copies of them made for its call (`perturbed`,
        `perturbed_rows`, `perturbed_range`); the copy at θ − c·z is the one at θ + c·z reflected
        through θ (`reflect`).

Both give `passes(step, loss_fn)` (the pairs of one micro-batch), `apply(g, step)` (a step's
update) and `flush()` (θ current, all updates applied). They hold no state of their own: where a
weight sits is in the optimizer's per-parameter state (`at`), so the optimizer can switch
between them (`ZOOptimizer.schedule`) before a step.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Container
import torch

from zotune.eps import ROUND_TRIP_SAMPLE, round_trip_warning
from zotune.kernels import move_perturbation_, perturb_, perturb_rows
from zotune.noise import seed_for, step_seed
from zotune.points import Point, Update



class InPlace:
    """`opt`'s in-place schedule (`opt`: the `ZOOptimizer` whose state and kernels it uses)."""

    def __init__(self, opt, schedule: str):
        self.opt, self.sequential = opt, schedule == "sequential"

    def passes(self, step: int, loss_fn: Callable | None, runs: Container[int]) -> list[tuple[float, float]]:
        """`loss_fn()` is the loss at the current weights, which move around it, one direction after
        the other; None replays the moves without forwards. A direction not in `runs` gives (nan, nan),
        its moves still made: the weights end where they would have (the round trips are not exact)."""
        opt, s = self.opt, step_seed(self.opt.seed, step)
        a, b = opt.offsets
        losses = []
        for k in range(opt.q):
            measure = loss_fn if k in runs else None
            self.move(Point(s, k, a))
            loss_a = measure() if measure else math.nan
            if b == 0 and opt.estimator.loss_at_theta:  # the second point is θ, whose loss is taken
                loss_b = opt.losses_at_theta[-1]
            else:
                self.move(Point(s, k, b))
                loss_b = measure() if measure else math.nan
            if self.sequential:
                self.move(None)
            losses.append((loss_a, loss_b))
        return losses

    def apply(self, g: list[float], step: int) -> None:
        self.move(None, g, step)

    def flush(self) -> bool:
        dirty = False
        for name, p, _ in self.opt.named_params():
            if self.opt.state[p].get("at") is not None:
                self._move_param(name, p, None)
                dirty = True
        return dirty

    def move(self, to: Point | None, g: list[float] | None = None, step: int | None = None) -> None:
        """One pass over every parameter: to displacement `to`, applying the update (g, step) on the way."""
        for name, p, group in self.opt.named_params():
            self._move_param(name, p, to, None if g is None else Update(g, step, group["lr"], group["weight_decay"]))

    def _move_param(self, name: str, p: torch.nn.Parameter, to: Point | None, update: Update | None = None) -> None:
        """Take one parameter from its displacement `state["at"]` to `to`, applying `update` on the way.

        Each branch is one in-place kernel that regenerates its z. A 16-bit weight with a master copy
        is written as round(master + displacement), so its master is never displaced."""
        opt = self.opt
        state = opt.state[p]
        master = state.get("master")
        data = opt.held(name, p)[0]
        at = state.get("at") if master is None else None
        if update is not None:
            opt.update_param(name, p, update, restore=-at.coef if at is not None else 0.0)
            at = None
        kw = opt.kernel_kw(name, p, opt.current_step if update is None else update.step)
        if at is not None and to is not None and (at.seed, at.k) == (to.seed, to.k):
            perturb_(data, seed_for(to.seed, to.k, name), to.coef - at.coef, **kw)
        elif at is not None and to is not None:
            move_perturbation_(data, seed_for(at.seed, at.k, name), -at.coef, seed_for(to.seed, to.k, name), to.coef,
                               **kw)
        elif at is not None:
            perturb_(data, seed_for(at.seed, at.k, name), -at.coef, **kw)
        elif to is not None:
            perturb_(data, seed_for(to.seed, to.k, name), to.coef, master=master, **kw)
        elif master is not None:
            data.copy_(master)
        state["at"] = to

    def round_trip_change(self, name: str, p: torch.nn.Parameter, step: int) -> float:
        """The relative L2 change that the round trip θ → θ+a·z → θ+b·z → θ of `step`'s first
        direction leaves in `p` (its first `ROUND_TRIP_SAMPLE` elements): the same kernels run on a
        copy. 0 for a 16-bit weight with an fp32 master, which is restored from the master."""
        opt = self.opt
        if "master" in opt.state[p]:
            return 0.0
        kw = opt.kernel_kw(name, p, step)
        held = opt.held(name, p)[0]
        sample = held.flatten()[:ROUND_TRIP_SAMPLE] if kw["directions"] is None else held
        copy, seed, (a, b) = sample.clone(), seed_for(step_seed(opt.seed, step), 0, name), opt.offsets
        for coef in (a, b - a, -b):
            perturb_(copy, seed, coef, **kw)
        reference = sample.float()
        norm = reference.norm().item()
        return (copy.float() - reference).norm().item() / norm if norm else 0.0

    def check_round_trip(self, step: int) -> None:
        """Warn when the round trip moves the trainable tensor of smallest RMS (the one it moves most,
        relatively) by more than `zotune.eps.ROUND_TRIP_TOLERANCE`."""
        opt = self.opt
        held = [(name, p, opt.held(name, p)[0]) for name, p, _ in opt.named_params() if "master" not in opt.state[p]]
        candidates = [(torch.linalg.vector_norm(t, dtype=torch.float32).item() / math.sqrt(t.numel()), name, p)
                      for name, p, t in held if t.numel()]
        nonzero = [c for c in candidates if c[0] > 0]
        if not nonzero:
            return
        _, name, p = min(nonzero, key=lambda c: c[0])
        warning = round_trip_warning(opt.eps, self.round_trip_change(name, p, step), name, opt.schedule)
        if warning:
            warnings.warn(warning, stacklevel=3)


class OutOfPlace:
    """`opt`'s out-of-place schedule (`opt`: the `ZOOptimizer` whose state and kernels it uses)."""

    def __init__(self, opt):
        self.opt = opt

    def passes(self, step: int, loss_fn: Callable | None, runs: Container[int]) -> list[tuple[float, float]]:
        """`loss_fn(s, k)` returns (L_a, L_b), the engine running every module on its perturbed copies;
        with `slice_directions`, `loss_fn(s, (k_1, .., k_m))` returns the pairs of the directions in
        `runs` from one forward. A direction not in `runs`, or every one when `loss_fn` is None (replay),
        gives (nan, nan): θ does not move for them."""
        opt, s = self.opt, step_seed(self.opt.seed, step)
        ks = tuple(k for k in range(opt.q) if k in runs) if loss_fn else ()
        if opt.slice_directions and ks:  # all of them from one forward
            measured = dict(zip(ks, loss_fn(s, ks)))
        else:
            measured = {k: loss_fn(s, k) for k in ks}
        return [measured.get(k, (math.nan, math.nan)) for k in range(opt.q)]

    def apply(self, g: list[float], step: int) -> None:
        for name, p, group in self.opt.named_params():
            self.opt.update_param(name, p, Update(g, step, group["lr"], group["weight_decay"]))

    def flush(self) -> bool:
        return False  # θ is always current

    def perturbed(self, name: str, p: torch.nn.Parameter, at: Point, out: torch.Tensor) -> torch.Tensor:
        """`out` = θ + coef·z_k for parameter `p`, θ untouched."""
        opt = self.opt
        return perturb_(p.data, seed_for(at.seed, at.k, name), at.coef, master=opt.state[p].get("master"), out=out,
                        **opt.kernel_kw(name, p, opt.current_step))

    def reflects(self, at: Point, p: torch.nn.Parameter) -> bool:
        """Whether `p`'s copy at `at` is taken as the reflection through θ of its copy at the pair's
        other point (`reflect`): the second point of a symmetric pair (θ − c·z after θ + c·z), and
        not a 16-bit weight with an fp32 master, whose copies are rounded from the master."""
        return at.coef != 0 and tuple(self.opt.offsets) == (-at.coef, at.coef) and "master" not in self.opt.state[p]

    def reflect(self, p: torch.nn.Parameter, copy: torch.Tensor, index=...) -> torch.Tensor:
        """`copy`, θ + c·z for `p` (at `index` of it: rows, a slice), becomes 2θ − copy = θ − c·z,
        within an ulp of generating z again, in one pass without the noise."""
        return copy.lerp_(p.data[index], 2.0)

    def perturbed_range(self, name: str, p: torch.nn.Parameter, lo: int, hi: int, at: Point,
                        out: torch.Tensor) -> torch.Tensor:
        """`out` = rows lo..hi−1 of θ + coef·z_k."""
        master = self.opt.state[p].get("master")
        return perturb_(p.data[lo:hi], seed_for(at.seed, at.k, name), at.coef, kind=self.opt.kind,
                        offset=lo * p[0].numel(), master=None if master is None else master[lo:hi], out=out)

    def perturbed_rows(self, name: str, p: torch.nn.Parameter, rows: torch.Tensor, at: Point) -> torch.Tensor:
        """Rows `rows` of θ + coef·z_k, in p's dtype."""
        opt = self.opt
        theta = opt.state[p].get("master", p.data)
        kw = opt.kernel_kw(name, p, opt.current_step)
        return perturb_rows(theta, rows, seed_for(at.seed, at.k, name), at.coef, **kw).to(p.dtype)

"""Which training examples moved a prediction, from a ZO run's trajectory (TracIn along the run,
Pruthi et al., 2020, "Estimating Training Data Influence by Tracing Gradient Descent", arXiv:2002.08484).

Step t of ZO-SGD moved θ by −η_t·(1/q)·Σ_k ḡ_{t,k}·z_{t,k} (and weight decay). To first order, the
loss of a test example x′ changed by

    Δ_t ℓ(x′) ≈ −η_t·(1/q)·Σ_k ḡ_{t,k}·g_{t,k}(x′),
    g_{t,k}(x′) = (ℓ(θ_t + a·z_{t,k}; x′) − ℓ(θ_t + b·z_{t,k}; x′)) / (a − b)

and ḡ_{t,k} = Σ_r w_r·g_{t,k}(x_r) over the step's rows, which training recorded
(`zotune.influence.rows`), so the change splits exactly into one term per training row:

    c_t(x_r, x′) = −η_t·(1/q)·Σ_k w_r·g_{t,k}(x_r)·g_{t,k}(x′).

g_{t,k}(x′) costs two forwards of x′ at θ_t per direction: the trajectory is replayed step by step
(`ZOOptimizer.replay`) and, before each step, the test rows run at θ_t ± ε·z_{t,k} on perturbed copies
(`ZOOptimizer.measure`: θ is never moved, so the replay stays bit-exact). What first order leaves out
(the curvature along each step, O(η²); weight decay) is the remainder: the measured change of the
loss between the base and the final weights, minus the sum of the terms.

Self-influence (TracInCP's Σ_c η_c·‖∇ℓ(θ_c; x)‖² over checkpoints c, for finding mislabelled
examples): ‖∇ℓ‖² = E[(∇ℓ·z)²] for E[zzᵀ] = I, so it is estimated from m seeded directions per
checkpoint by the same two forwards per direction; `first_order_self_influence` computes it through
autograd as the reference.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from rich.progress import track

from zotune.batch import take_rows
from zotune.dual import DualEngine, model_loss
from zotune.errors import UserError
from zotune.first_order import load_gradients
from zotune.influence.rows import row_values
from zotune.noise import seed_for, step_seed
from zotune.optim import ZOOptimizer

SELF_INFLUENCE = -2  # the direction index from which self-influence's seeds derive: never a step's
PROJECTION_EPS = 1e-4  # the central difference step of projections (`Projector`)


def check_attributable(records: list[dict], where: str) -> None:
    """Every step kept its rows' projections (a ZO-SGD step on the loss: `zotune.influence.rows.attributable`)."""
    missing = next((r for r in records if "row_g" not in r), None)
    if missing is not None:
        raise UserError(f"{where}: step {missing['step']} has no per-example projections (rule {missing['rule']!r}, "
                        f"estimator {missing['estimator']!r}): attribution needs a ZO-SGD run on the loss, with an "
                        "estimator that takes two points per direction and without slice_directions, on a loss "
                        "that is the mean of its rows' (the training log says when it was not), recorded by a "
                        "zotune that keeps them")


@dataclass
class Batch:
    """Collated rows (the model's inputs, labels among them) and their indices in their data set."""

    inputs: dict
    index: list[int]


class Projector:
    """Per-row losses, and their projections g(x) along a direction, at the current θ of a replaying
    optimizer: two forwards per direction, every trainable module on its perturbed copies.

    The projections estimate the directional derivative ∇ℓ·z by a central difference of step `eps`.
    z has norm √d, so a step ε moves θ by ε·√d, where the loss is still curved: on tiny models
    trained with ε = 1e-2, differences taken at that ε left 40-80% of a loss change unexplained,
    at 1e-3 a few percent. The default, `PROJECTION_EPS` (or the run's ε if smaller), is small enough
    for the curvature and large enough for float32 losses. The training rows' projections stay the
    run's (they define its update)."""

    def __init__(self, model: torch.nn.Module, zo: ZOOptimizer, loss_of: Callable | None = None,
                 eps: float | None = None):
        self.model, self.zo = model.eval(), zo  # dropout off: every forward must see the same function
        self.loss_of = loss_of or functools.partial(model_loss, model)
        self.eps = eps if eps is not None else min(zo.eps, PROJECTION_EPS)
        self.engine = DualEngine(model, zo)

    @torch.no_grad()
    def losses(self, batch: Batch) -> list[float]:
        inputs = _on_device(batch.inputs, self.model)
        labels = inputs.pop("labels")
        return row_values(self.model(**inputs), labels, len(labels), self.loss_of)

    def along(self, batch: Batch, direction: tuple[int, int]) -> list[float]:
        """g(x) of each row along z of `direction` = (seed, k), at the optimizer's offsets (within
        `ZOOptimizer.measure`, those of `eps`)."""
        values = []
        for half in (0, 1):
            with self.engine.dual_forward(0, direction, half=half):
                values.append(self.losses(batch))
        a, b = self.zo.offsets
        return [(la - lb) / (a - b) for la, lb in zip(*values)]

    def at_step(self, batch: Batch, step: int) -> list[list[float]]:
        """g_{t,k}(x) of each row for each of step t's directions k (`ZOOptimizer.measure`)."""
        return self.zo.measure(step, lambda s, k: self.along(batch, (s, k)), eps=self.eps)

    def mean_square(self, batch: Batch, step: int, seed: int, directions: int) -> list[float]:
        """mean_j g_j(x)² over `directions` directions of `seed`: ‖∇ℓ(x)‖² in expectation (E[zzᵀ] = I)."""
        per_direction = self.zo.measure(step, lambda s, k: self.along(batch, (s, k)), eps=self.eps, seed=seed,
                                        directions=directions)
        return [sum(g[r] ** 2 for g in per_direction) / directions for r in range(len(batch.index))]

    def remove(self) -> None:
        self.engine.remove()


@dataclass
class Attribution:
    """Per test row: its losses before and after, and the terms c(x_r, x′) summed by training index."""

    before: list[float]
    after: list[float] = field(default_factory=list)
    terms: dict[int | str, list[float]] = field(default_factory=dict)  # training index -> one value per test row
    steps_measured: list[int] = field(default_factory=list)
    every: int = 1
    next_position: int = 0  # of the record to measure next; the ones before it are counted in `terms`

    def attributed(self) -> list[float]:
        n = len(self.before)
        return [sum(values[i] for values in self.terms.values()) for i in range(n)]


def _replay(zo: ZOOptimizer, record: dict, log_dir) -> None:
    zo.replay(record, load_gradients(log_dir, record))


def attribute(projector: Projector, records: list[dict], test: list[Batch], log_dir, *, every: int = 1,
              state: Attribution | None = None, progress: bool = True,
              checkpoint: Callable[[Attribution], None] | None = None) -> Attribution:
    """Replay `records` from the optimizer's θ (the base weights), splitting each measured step's
    first-order change of every test row's loss into the terms of the step's training rows.

    `every` > 1 measures only the steps t with t % every == 0 and counts each for `every` steps
    (an estimate, said in the output). `checkpoint(state)` is called after each measured step; given
    back as `state`, it resumes the attribution of the same records: the steps already counted are
    replayed without forwards."""
    zo = projector.zo
    check_attributable(records, str(log_dir))
    if state is None:
        state = Attribution([v for b in test for v in projector.losses(b)], every=every)
    for position, record in enumerate(track(records, description="attributing", disable=not progress)):
        if position >= state.next_position and record["step"] % state.every == 0 and record["g"] is not None:
            per_batch = [projector.at_step(b, record["step"]) for b in test]  # [batch][k][row]
            test_g = [[v for batch in per_batch for v in batch[k]] for k in range(record["q"])]
            _add_terms(state, record, test_g, state.every)
            state.steps_measured.append(record["step"])
            state.next_position = position + 1
            if checkpoint is not None:
                checkpoint(state)
        _replay(zo, record, log_dir)
    zo.flush()
    state.after = [v for b in test for v in projector.losses(b)]
    return state


def _add_terms(state: Attribution, record: dict, test_g: list[list[float]], every: int) -> None:
    """c(x_r, x′) = −η·(1/q)·Σ_k w_r·g_k(x_r)·g_k(x′), times `every`, added under x_r's index."""
    q, scale = record["q"], -record["lr"] * every / record["q"]
    train_g = torch.tensor(record["row_g"], dtype=torch.float64)  # q × rows
    weights = torch.tensor(record["row_weight"], dtype=torch.float64)
    terms = scale * (weights[:, None] * train_g.T) @ torch.tensor(test_g, dtype=torch.float64).view(q, -1)
    for r, index in enumerate(record["row_index"]):
        key = index if index is not None else f"{record['step']}:{r}"
        row = state.terms.setdefault(key, [0.0] * terms.shape[1])
        for i, v in enumerate(terms[r].tolist()):
            row[i] += v


def _on_device(inputs: dict, model: torch.nn.Module) -> dict:
    device = next(model.parameters()).device
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}


def checkpoint_steps(records: list[dict], checkpoints: int) -> list[int]:
    """Positions of `checkpoints` records evenly spread over the run, the last at its final step:
    θ before each (the base model, which has learnt nothing, is not one)."""
    n = len(records)
    return sorted({int((c + 1) * n / checkpoints) - 1 for c in range(checkpoints)} if n else set())


def self_influence(projector: Projector, records: list[dict], train: list[Batch], log_dir, *, checkpoints: int = 4,
                   directions: int = 16, progress: bool = True) -> dict[int, float]:
    """Σ_c η_c·mean_j g_{c,j}(x)² for every training row, with `directions` seeded directions at each
    of `checkpoints` checkpoints (θ before the step at each `checkpoint_steps` position)."""
    return _at_checkpoints(projector.zo, records, train, log_dir, checkpoints, progress, "self-influence (ZO)",
                           lambda batch, step, s: projector.mean_square(batch, step, s, directions))


def first_order_self_influence(model: torch.nn.Module, zo: ZOOptimizer, records: list[dict], train: list[Batch],
                               log_dir, loss_of: Callable | None = None, *, checkpoints: int = 4,
                               progress: bool = True) -> dict[int, float]:
    """TracInCP's Σ_c η_c·‖∇ℓ(θ_c; x)‖² through autograd, one row at a time, over the trained parameters."""
    loss_of = loss_of or functools.partial(model_loss, model)
    params = [p for _, p, _ in zo.named_params()]

    def squared_norms(batch: Batch, _step: int, _seed: int) -> list[float]:
        inputs = _on_device(batch.inputs, model)
        labels = inputs.pop("labels")
        norms = []
        for r in range(len(labels)):
            row = take_rows(inputs, lambda v, r=r: v[r:r + 1], len(labels))
            with torch.enable_grad():
                grads = torch.autograd.grad(loss_of(model(**row), labels[r:r + 1]), params, allow_unused=True)
            norms.append(sum(float(g.double().pow(2).sum()) for g in grads if g is not None))
        return norms

    return _at_checkpoints(zo, records, train, log_dir, checkpoints, progress, "self-influence (first order)",
                           squared_norms)


def _at_checkpoints(zo: ZOOptimizer, records: list[dict], train: list[Batch], log_dir, checkpoints: int,
                    progress: bool, what: str, per_row: Callable[[Batch, int, int], list[float]]) -> dict[int, float]:
    at = set(checkpoint_steps(records, checkpoints))
    scores: dict[int, float] = {}
    for position, record in enumerate(track(records, description=what, disable=not progress)):
        if position in at:
            seed = seed_for(step_seed(zo.seed, record["step"]), SELF_INFLUENCE, "zotune.influence")
            zo.flush()
            for batch in train:
                for index, value in zip(batch.index, per_row(batch, record["step"], seed)):
                    scores[index] = scores.get(index, 0.0) + record["lr"] * value
        _replay(zo, record, log_dir)
    zo.flush()
    return scores


def batches(rows: list[dict], collator: Callable, size: int, index_key: str) -> Iterator[Batch]:
    """`rows` (features) collated in batches of `size`, each with its rows' `index_key` values."""
    for lo in range(0, len(rows), size):
        chunk = rows[lo:lo + size]
        inputs = {k: v for k, v in collator(chunk).items() if k != index_key}
        yield Batch(inputs, [f[index_key] for f in chunk])


def spearman(a: Iterable[float], b: Iterable[float]) -> float:
    """Spearman's rank correlation (scores are continuous: ties are not averaged)."""
    ra, rb = (np.argsort(np.argsort(np.asarray(list(v)))) for v in (a, b))
    return float(np.corrcoef(ra, rb)[0, 1])

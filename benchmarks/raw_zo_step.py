"""A ZO step outside the Trainer, shared by the benchmarks: ZOOptimizer, and for dual the DualEngine
with each half's loss computed as the trainer does."""

from __future__ import annotations

import torch

from zotune.dual import DualEngine, call_halves
from zotune.optim import ZOOptimizer


def zo_step_fn(model, batch, schedule: str, perturbation: str = "gaussian", **methods):
    """One ZO step (estimate + update) as a function of the step number, and the dual engine if any.
    Trains the parameters that require grad. `methods` go to the optimizer: `rule`, `estimator`, `num_directions`."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = ZOOptimizer(trainable, lr=1e-7, eps=1e-3, perturbation=perturbation, schedule=schedule, **methods)
    engine = None
    if schedule == "dual":
        engine = DualEngine(model, opt)

        def loss_fn(s, k):
            return call_halves(engine, model, (s, k), lambda: model(**batch).loss)
    else:
        def loss_fn():
            return model(**batch).loss.item()

    def step(n: int) -> None:
        with torch.no_grad():
            opt.estimate(loss_fn, n)
            opt.step()

    step.optimizer = opt
    return step, engine

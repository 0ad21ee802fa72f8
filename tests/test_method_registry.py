"""The registry of methods and the one view of a step that a method gets from the optimizer."""

import pytest
import torch
from helpers import NOISE

from zotune.methods import registry
from zotune.methods.base import Estimator, Noise, StepView
from zotune.methods.registry import build_estimator, build_rule, register_estimator, register_rule
from zotune.methods.rules.sgd import SGD
from zotune.optim import ZOOptimizer

THETA0 = torch.linspace(0.3, -0.6, 10)


@pytest.fixture(autouse=True)
def own_tables(monkeypatch):
    """Methods registered by a test leave the shipped tables as they were."""
    monkeypatch.setattr(registry, "RULES", dict(registry.RULES))
    monkeypatch.setattr(registry, "ESTIMATORS", dict(registry.ESTIMATORS))


def test_register_refuses_the_wrong_kind_and_a_taken_name():
    with pytest.raises(TypeError, match="Odd is not a subclass of Rule"):
        register_rule(type("Odd", (Estimator,), {"name": "odd"}))
    with pytest.raises(TypeError, match="SGD is not a subclass of Estimator"):
        register_estimator(SGD)
    with pytest.raises(ValueError, match="a rule named 'sgd' is registered already"):
        register_rule(type("Again", (SGD,), {"name": "sgd"}))


def train(rule, estimator, steps: int = 2):
    """Steps of two directions and two micro-batches each on a quadratic: the optimizer, w and b, the records."""
    w, b = torch.nn.Parameter(THETA0.clone()), torch.nn.Parameter(torch.zeros(3))
    opt = ZOOptimizer([("w", w), ("b", b)], lr=0.05, eps=1e-2, num_directions=2, schedule="sequential", rule=rule,
                      estimator=estimator, seed=7)
    records = []
    for step in range(steps):
        for target in (0.5, -0.5):
            opt.estimate(lambda t=target: float(((w.detach() - t) ** 2).sum() + (b.detach() ** 2).sum()), step)
        records.append(opt.step())
    return opt, (w, b), records


def test_a_registered_rule_is_a_recipe_name_and_sees_the_step():
    views = []

    @register_rule
    class Watching(SGD):
        name = "watching"

        def choose(self, view, g, recorded):
            views.append(view)
            return super().choose(view, g, recorded)

    opt, trained, records = train(build_rule("watching"), "spsa")
    _, plain, _ = train("sgd", "spsa")
    assert all(torch.equal(a.detach(), b.detach()) for a, b in zip(trained, plain))  # the view changed nothing
    for view, record in zip(views, records, strict=True):
        assert isinstance(view, StepView) and view.noise == Noise(7, NOISE)
        assert (view.step, view.seed, view.lr) == (record["step"], record["seed"], record["lr"])
        assert view.losses == tuple(zip(record["loss_plus"], record["loss_minus"]))
        assert [(p.name, p.param, p.state) for p in view.params] == [(n, t, opt.state[t])
                                                                     for n, t in zip("wb", trained)]


def test_a_registered_estimator_sees_each_parameter_and_the_step():
    seen = []

    @register_estimator
    class Watching(Estimator):
        name = "watching"

        def directions(self, p, step, noise):
            seen.append(("directions", p.name, step, noise))
            return None  # plain noise

        def begin_step(self, view):
            seen.append(("begin", view.step, view.losses, [p.name for p in view.params]))
            return {"began": view.step}

        def end_step(self, view, record):
            seen.append(("end", view.step, view.losses == tuple(zip(record["loss_plus"], record["loss_minus"]))))

    _, trained, records = train("sgd", build_estimator("watching"), steps=1)
    _, plain, _ = train("sgd", "spsa", steps=1)
    assert all(torch.equal(a.detach(), b.detach()) for a, b in zip(trained, plain))
    assert records[0]["began"] == 0
    assert seen[0] == ("begin", 0, (), ["w", "b"]) and seen[-1] == ("end", 0, True)
    assert {entry[1:] for entry in seen if entry[0] == "directions"} == {(n, 0, Noise(7, NOISE)) for n in "wb"}

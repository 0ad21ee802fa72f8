"""ZO update rules and gradient estimators, registered by name.

A recipe picks them with `zo.rule` and `zo.estimator`, either a bare name or a mapping with
`name` plus that method's settings::

    zo:
      rule: {name: momentum, beta: 0.9}
      estimator: {name: sparse, density: 0.1, mask: magnitude}

Each method lives in its own module under `rules/` or `estimators/`, with its settings (a
pydantic `Config`), a docstring citing its paper, and its costs; `@register_rule` / `@register_estimator`
(`zotune.methods.registry`) add it to the tables. A method sees of the optimizer only what
`zotune.methods.base` hands it: a `ParamUpdate` to apply, a `StepView` of the step.
"""

from zotune.methods.base import Estimator, MethodConfig, Noise, ParamUpdate, Rule, StepView, Trainable
from zotune.methods.estimators import cge, fzoos, guided, hizoo, lowrank, onesided, sparse, spsa  # noqa: F401 (importing registers them)
from zotune.methods.registry import (
    ESTIMATORS,
    RULES,
    build_estimator,
    build_rule,
    check_compatible,
    register_estimator,
    register_rule,
)
from zotune.methods.rules import adam, addax, conservative, es, fzoo, momentum, sgd, sign  # noqa: F401 (importing registers them)

__all__ = ["RULES", "ESTIMATORS", "register_rule", "register_estimator", "build_rule", "build_estimator",
           "check_compatible", "Rule", "Estimator", "MethodConfig", "ParamUpdate", "StepView", "Trainable", "Noise"]

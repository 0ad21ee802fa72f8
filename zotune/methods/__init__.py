"""ZO update rules and gradient estimators, registered by name.

A recipe picks them with `zo.rule` and `zo.estimator`, either a bare name or a mapping with
`name` plus that method's settings::

    zo:
      rule: {name: momentum, beta: 0.9}
      estimator: {name: sparse, density: 0.1, mask: magnitude}

Each method lives in its own module under `rules/` or `estimators/`, with its settings (a
pydantic `Config`), a docstring citing its paper, and its costs; `register` adds it here.
"""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import ValidationError

from zotune.methods.base import Estimator, MethodConfig, ParamUpdate, Rule

RULES: dict[str, type[Rule]] = {}
ESTIMATORS: dict[str, type[Estimator]] = {}


def register(cls):
    """Class decorator: make a rule or estimator available under `cls.name`."""
    table = RULES if issubclass(cls, Rule) else ESTIMATORS
    if cls.name in table:
        raise ValueError(f"a method named {cls.name!r} is registered already")
    table[cls.name] = cls
    return cls


def _build(table: dict, what: str, spec: str | dict[str, Any]):
    fields = {"name": spec} if isinstance(spec, str) else dict(spec)
    name = fields.pop("name", None)
    if not isinstance(name, str) or name not in table:
        message = f"unknown {what} {name!r}; choose one of {', '.join(table)}"
        close = difflib.get_close_matches(str(name), list(table), n=1)
        raise ValueError(message + (f" (did you mean {close[0]!r}?)" if close else ""))
    if any(not isinstance(key, str) for key in fields):
        raise ValueError(f"{what} {name!r}: setting names must be strings")
    cls = table[name]
    try:
        return cls(cls.Config(**fields))
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ValueError(f"{what} {name!r}: {problems}") from None


def build_rule(spec: str | dict[str, Any]) -> Rule:
    """The rule a recipe names: `"adam"` or `{"name": "adam", "beta1": 0.9, ...}`."""
    return _build(RULES, "rule", spec)


def build_estimator(spec: str | dict[str, Any]) -> Estimator:
    """The estimator a recipe names: `"spsa"` or `{"name": "sparse", "density": 0.1}`."""
    return _build(ESTIMATORS, "estimator", spec)


def check_compatible(rule: Rule, estimator: Estimator, *, schedule: str, lazy_update: bool, num_directions: int) -> None:
    """Raise ValueError when the rule or the estimator cannot run with these settings."""
    if lazy_update and not (rule.name == "sgd" and estimator.plain):
        raise ValueError("lazy_update folds a ZO-SGD update into the next step's noise pass: it needs rule 'sgd' "
                         f"and estimator 'spsa', not {rule.name!r} and {estimator.name!r}")
    for method in (rule, estimator):
        refusal = method.refusal(schedule=schedule, lazy_update=lazy_update, num_directions=num_directions)
        if refusal:
            raise ValueError(refusal)


# importing the method modules registers them
from zotune.methods.estimators import hizoo, lowrank, sparse, spsa  # noqa: E402,F401
from zotune.methods.rules import adam, conservative, momentum, sgd, sign  # noqa: E402,F401

__all__ = ["RULES", "ESTIMATORS", "register", "build_rule", "build_estimator", "check_compatible", "Rule", "Estimator",
           "MethodConfig", "ParamUpdate"]

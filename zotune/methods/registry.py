"""The rules and estimators a recipe can name, and how a recipe's choice becomes a method.

A method module registers its class with `@register_rule` or `@register_estimator`; importing
`zotune.methods` imports every shipped method module, so the tables are full by the time
anything reads them.
"""

from __future__ import annotations

import difflib
from typing import Any, TypeVar

from pydantic import ValidationError

from zotune.methods.base import Estimator, Method, Rule

RULES: dict[str, type[Rule]] = {}
ESTIMATORS: dict[str, type[Estimator]] = {}

M = TypeVar("M", bound=type[Method])


def _register(table: dict, base: type[Method], cls: M) -> M:
    if not issubclass(cls, base):
        raise TypeError(f"{cls.__name__} is not a subclass of {base.__name__}")
    if cls.name in table:
        raise ValueError(f"a {base.__name__.lower()} named {cls.name!r} is registered already")
    table[cls.name] = cls
    return cls


def register_rule(cls: M) -> M:
    """Class decorator: make an update rule available to recipes as `zo.rule: <cls.name>`."""
    return _register(RULES, Rule, cls)


def register_estimator(cls: M) -> M:
    """Class decorator: make an estimator available to recipes as `zo.estimator: <cls.name>`."""
    return _register(ESTIMATORS, Estimator, cls)


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


def check_compatible(rule: Rule, estimator: Estimator, *, schedule: str, num_directions: int) -> None:
    """Raise ValueError when the rule or the estimator cannot run with these settings."""
    if estimator.corrects_estimate and type(rule).choose is not Rule.choose:
        raise ValueError(f"estimator {estimator.name!r} corrects the estimate in the units of the projected "
                         f"gradients, which rule {rule.name!r} rescales or chooses among: use a rule that applies "
                         "them as they are (sgd, momentum, adam, sign)")
    if rule.antithetic_population:
        a, b = estimator.offsets(1.0)
        if a != -b:
            raise ValueError(f"rule {rule.name!r} takes the 2q losses for a population of antithetic members θ ± c·z, "
                             f"but estimator {estimator.name!r} measures θ + {a:g}·eps·z and θ + {b:g}·eps·z: use "
                             "one that measures both signs (spsa, the default)")
    for method in (rule, estimator):
        refusal = method.refusal(schedule=schedule, num_directions=num_directions)
        if refusal:
            raise ValueError(refusal)

"""Reward functions with trl's signature, and the one check every value they return passes.

A reward function is called as trl's `GRPOTrainer` calls one::

    f(completions=[str, ...], prompts=[str, ...], completion_ids=[[int, ...], ...], **columns) -> list[float]

`columns` are the prompt rows' other data columns, one list entry per completion. It is given as a
callable or an import path 'package.module:function'. Several functions are summed with their
weights. A function that raises, returns a list of the wrong length, a non-number or a NaN stops the
run with one line naming the function and the prompt: nothing of the failed step is written.
"""

from __future__ import annotations

import math
import numbers
import reprlib
from collections.abc import Callable, Sequence

from zotune.errors import UserError
from zotune.objectives import IMPORT_PATH, import_function

KEY = "reward.functions"


def function_name(fn: Callable) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


class RewardFunctions:
    """Reward functions and their weights; `__call__` gives each completion's weighted reward."""

    def __init__(self, functions: Sequence[Callable | str] | Callable | str, weights: Sequence[float] | None = None):
        functions = [functions] if callable(functions) or isinstance(functions, str) else list(functions)
        if not functions:
            raise UserError(f"{KEY}: give at least one reward function")
        self.functions = [self._load(f) for f in functions]
        self.weights = [1.0] * len(self.functions) if weights is None else [float(w) for w in weights]
        if len(self.weights) != len(self.functions):
            raise UserError(f"{KEY}: {len(self.weights)} weights for {len(self.functions)} reward functions")
        self.names = [function_name(f) if not isinstance(s, str) else s for f, s in zip(self.functions, functions)]

    @staticmethod
    def _load(spec: Callable | str) -> Callable:
        if callable(spec):
            return spec
        if not isinstance(spec, str) or not IMPORT_PATH.fullmatch(spec):
            raise UserError(f"{KEY}: {reprlib.repr(spec)} is neither a callable nor an import path "
                            "'package.module:function'")
        return import_function(spec, KEY)

    def __call__(self, completions: list[str], prompts: list[str], completion_ids: list[list[int]],
                 columns: dict[str, list]) -> list[float]:
        total = [0.0] * len(completions)
        for fn, name, weight in zip(self.functions, self.names, self.weights):
            for i, r in enumerate(self._rewards(fn, name, completions, prompts, completion_ids, columns)):
                total[i] += weight * r
        return total

    @staticmethod
    def _rewards(fn, name, completions, prompts, completion_ids, columns) -> list[float]:
        def where(i: int | None = None) -> str:
            i = 0 if i is None else i
            return f"reward function {name!r} on prompt {i} ({reprlib.repr(prompts[i])})"

        try:
            values = fn(completions=completions, prompts=prompts, completion_ids=completion_ids, **columns)
        except Exception as e:  # noqa: BLE001 - the user's function failed: one line, theirs
            raise UserError(f"{where()}: raised {type(e).__name__}: {e}") from None
        if not isinstance(values, Sequence) or isinstance(values, str) or len(values) != len(completions):
            got = f"{len(values)} values" if isinstance(values, Sequence) else f"a {type(values).__name__}"
            raise UserError(f"{where()}: returned {got}, not a list of {len(completions)} floats (one per completion)")
        rewards = []
        for i, v in enumerate(values):
            if not isinstance(v, numbers.Real) or isinstance(v, bool):
                raise UserError(f"{where(i)}: returned {reprlib.repr(v)} ({type(v).__name__}), not a number")
            if not math.isfinite(v):
                raise UserError(f"{where(i)}: returned {v} for completion {reprlib.repr(completions[i])}")
            rewards.append(float(v))
        return rewards

"""Objectives: what the ZO step minimizes, chosen by the recipe key `zo.objective`.

ZO needs only the objective's values at θ+εz and θ−εz, never its gradient, so it can train
on a metric that backprop cannot: accuracy or F1 on the batch, as MeZO showed (Malladi et al.,
2023, arXiv:2305.17333), or any score a Python function computes.

- `loss` (the default): the task's loss, as the Trainer computes it.
- `accuracy`: 1 − the batch's accuracy (classification).
- `f1`: 1 − the batch's macro F1, the mean F1 over the classes that occur among the batch's
  labels or predictions (classification).
- `package.module:function`: a user function, imported when the trainer is configured. Only
  this key imports anything.

The classification metrics read the class scores that evaluation reads: the label words'
logits at the last position for a causal LM (the task's `preprocess_logits_for_metrics`), the
classifier's logits for a `...ForSequenceClassification` model. A row's prediction is its argmax.

A user function is called as `fn(outputs, labels)` once per forward, under `torch.no_grad()`
with dropout off, and returns a float or a one-element tensor; lower is better (return 1 − s
for a score s). Its arguments:

- `outputs`: the model's output (a transformers `ModelOutput`). `outputs.logits` is
  (B, 1, V) for classification with a causal LM (the last position only), (B, classes) for a
  sequence classifier, (B, T, V) for sft and lm.
- `labels`: the batch's labels: class indices (B,) for classification; token ids (B, T) for
  sft and lm, -100 where nothing is scored, not shifted (the logits at t predict labels[t+1]).

Under the `dual` schedule each half of the doubled forward is passed separately, with the
batch's own rows, so every schedule sees the same values. A function given to `ZOConfig`
directly must be defined at module level: checkpoints pickle the arguments.
"""

from __future__ import annotations

import difflib
import importlib
import math
import numbers
import re
import reprlib
from collections.abc import Callable
from functools import partial
from typing import Any

from zotune.errors import UserError

KEY = "zo.objective"
IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")
Objective = Callable[[Any, Any], float]  # (outputs, labels) -> value, lower is better


def _accuracy(predicted, labels) -> float:
    return (predicted == labels).float().mean().item()


def _macro_f1(predicted, labels) -> float:
    f1 = []
    for k in set(labels.tolist()) | set(predicted.tolist()):
        hits = ((predicted == k) & (labels == k)).sum().item()
        f1.append(2 * hits / ((predicted == k).sum() + (labels == k).sum()).item())  # 2·TP / (2·TP + FP + FN)
    return sum(f1) / len(f1)


METRICS = {"accuracy": _accuracy, "f1": _macro_f1}
BUILTINS = ("loss", *METRICS)


def check_name(spec: str) -> str:
    """The schema's check of `zo.objective`: a built-in name or the form of an import path (nothing is imported)."""
    if spec in BUILTINS or IMPORT_PATH.fullmatch(spec):
        return spec
    message = (f"unknown objective {spec!r}; use one of {', '.join(BUILTINS)} "
               "or an import path 'package.module:function'")
    close = difflib.get_close_matches(spec, BUILTINS, n=1)
    raise ValueError(message + (f"; did you mean {close[0]!r}?" if close else ""))


def load_objective(spec: str | Callable, class_scores: Callable | None = None) -> Objective | None:
    """`spec` as a function (outputs, labels) -> float, or None for `loss` (the Trainer's own loss).

    `class_scores(logits, labels)` maps a classification batch's logits to its class scores
    (the task's `preprocess_logits_for_metrics`); None: the logits are the class scores.
    """
    if callable(spec):
        return partial(_checked, spec, getattr(spec, "__qualname__", repr(spec)))
    try:
        check_name(spec)
    except ValueError as e:
        raise UserError(f"{KEY}: {e}") from None
    if spec == "loss":
        return None
    if spec in METRICS:
        return partial(_one_minus_metric, spec, class_scores)
    return partial(_checked, import_function(spec, KEY), spec)


def import_function(path: str, key: str) -> Callable:
    """The function at import path 'package.module:function'; a failure is a UserError naming `key`."""
    module_name, name = path.split(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 -- any failure to import the user's module is reported as theirs
        raise UserError(f"{key}: cannot import module {module_name!r} of {path!r}: {type(e).__name__}: {e}") from None
    if not hasattr(module, name):
        close = difflib.get_close_matches(name, [n for n in dir(module) if not n.startswith("_")], n=1)
        raise UserError(f"{key}: module {module_name!r} has no attribute {name!r}"
                        + (f"; did you mean {close[0]!r}?" if close else ""))
    fn = getattr(module, name)
    if not callable(fn):
        raise UserError(f"{key}: {path} is not callable: it is {reprlib.repr(fn)}")
    return fn


def _checked(fn: Callable, name: str, outputs, labels) -> float:
    value = fn(outputs, labels)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    shape = getattr(value, "shape", None)
    if shape is not None and math.prod(shape) == 1:
        return float(value.item())
    what = f"{type(value).__name__} of shape {tuple(shape)}" if shape is not None else type(value).__name__
    raise UserError(f"{KEY}: {name} returned a {what}, not a scalar (a float or a one-element tensor)")


def _one_minus_metric(name: str, class_scores: Callable | None, outputs, labels) -> float:
    scores = outputs.logits if class_scores is None else class_scores(outputs.logits, labels)
    if labels is None or labels.dim() != 1 or scores.dim() != 2 or len(scores) != len(labels):
        got = "no labels" if labels is None else f"labels of shape {tuple(labels.shape)}"
        raise UserError(
            f"{KEY}: {name!r} is a classification metric: it needs one class index per row and class scores of "
            f"shape (rows, classes), but the batch has {got} and scores of shape {tuple(scores.shape)}; "
            "use it with data.task: classification"
        )
    return 1.0 - METRICS[name](scores.argmax(-1), labels.to(scores.device))

"""Where a weight sits during a ZO step, and the update it owes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Point:
    """θ + coef·z_k of the step with seed `seed`."""

    seed: int
    k: int
    coef: float


@dataclass(frozen=True)
class Update:
    """One parameter group's share of a step's update: θ ← rule(θ, ĝ), ĝ = (1/q) Σ_k g_k z_k."""

    g: list[float]
    step: int
    lr: float
    wd: float

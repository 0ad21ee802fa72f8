"""spsa: simultaneous-perturbation estimates along plain noise (MeZO's estimator), n-SPSA with q > 1."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from zotune.methods.base import Estimator, MethodConfig
from zotune.methods.registry import register_estimator


class SPSAConfig(MethodConfig):
    sided: Literal["two", "one"] = Field(
        "two", description="two: losses at θ ± εz, g = (L⁺ − L⁻)/(2ε); one: at θ + εz and θ, g = (L⁺ − L(θ))/ε."
    )


@register_estimator
class SPSA(Estimator):
    """SPSA (Spall, 1992, "Multivariate Stochastic Approximation Using a Simultaneous
    Perturbation Gradient Approximation", IEEE TAC 37(3)) with Gaussian or Rademacher z, as in
    MeZO (arXiv:2305.17333). With `zo.num_directions` q > 1 it is n-SPSA: q directions per step,
    each from its own seed, their estimates averaged (q times the forwards, variance / q).

    Two-sided has O(ε²) bias, one-sided O(ε). One-sided takes L(θ) for each direction, so here
    it costs the same two forwards (or one doubled forward) per direction as two-sided.
    """

    name = "spsa"
    paper = "Spall, 1992; Malladi et al., 2023, arXiv:2305.17333"
    Config = SPSAConfig
    plain = True

    def offsets(self, eps):
        return (eps, -eps) if self.config.sided == "two" else (eps, 0.0)

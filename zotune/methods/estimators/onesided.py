"""onesided: q directions, each with its loss at θ + εz_k, and L(θ) once per micro-batch (FZOO's estimator)."""

from __future__ import annotations

from zotune.methods.base import Estimator
from zotune.methods.registry import register_estimator


@register_estimator
class OneSided(Estimator):
    """Batched one-sided SPSA, as in FZOO (Dang et al., 2025, "FZOO: Fast Zeroth-Order Optimizer
    for Fine-Tuning Large Language Models towards Adam-Scale Speed", arXiv:2506.09034)::

        g_k = (L(θ + ε·z_k) − L(θ)) / ε        k = 0..q−1, L(θ) taken once and shared

    q + 1 forwards per micro-batch, where `spsa` with `sided: one` takes L(θ) again for every
    direction (2q). The bias is O(ε), as for any one-sided difference. FZOO pairs it with
    Rademacher z (`zo.perturbation: rademacher`) and the `fzoo` rule. The shared forward is a
    plain one at θ: sequential or fused schedule.
    """

    name = "onesided"
    paper = "Dang et al., 2025, arXiv:2506.09034"
    plain = True
    loss_at_theta = True  # with offsets (ε, 0): each direction's second loss is this L(θ)

    def offsets(self, eps):
        return eps, 0.0

    def refusal(self, *, schedule, num_directions):
        if schedule == "dual":
            return "estimator 'onesided' shares a plain forward at θ between its directions: use schedule " \
                   "sequential or fused"
        return None

"""fzoo: ZO-SGD divided by the standard deviation of the step's perturbed losses (FZOO)."""

from __future__ import annotations

import math
import statistics

from zotune.methods.registry import register_rule
from zotune.methods.rules.sgd import SGD


@register_rule
class FZOO(SGD):
    """FZOO's normalised step (Dang et al., 2025, "FZOO: Fast Zeroth-Order Optimizer for
    Fine-Tuning Large Language Models towards Adam-Scale Speed", arXiv:2506.09034)::

        θ ← θ·(1 − lr·wd) − (lr / σ)·(1/q) Σ_k g_k z_k

    σ is the sample standard deviation, over the q directions, of the loss at each direction's
    first point θ + a·z_k (averaged over the step's micro-batches and ranks): the step grows
    where the loss is flat and shrinks where it is steep, like a normalised SGD. So lr has other
    units than ZO-SGD's: a step moves θ by about lr/(ε·√q) per element. σ is recorded with the
    step, and replay divides by the recorded value; a step with σ = 0 applies nothing. It needs
    q ≥ 2. With the `onesided` estimator and Rademacher z it is the FZOO of the paper.
    """

    name = "fzoo"
    paper = "Dang et al., 2025, arXiv:2506.09034"

    def refusal(self, *, schedule, num_directions):
        if num_directions < 2:
            return "rule 'fzoo' divides by the standard deviation of the directions' losses: use num_directions >= 2"
        return None

    def spread(self, losses: list[tuple[float, float]], q: int) -> float:
        """σ of the step's pairs (q per micro-batch): the sample deviation of the first points' losses."""
        firsts = [loss for loss, _ in losses]
        return statistics.stdev(statistics.fmean(firsts[k::q]) for k in range(q))

    def choose(self, view, g, recorded):
        sigma = recorded["sigma"] if recorded is not None else self.spread(list(view.losses), len(g))
        if not (math.isfinite(sigma) and sigma > 0):
            return None, {"sigma": sigma}
        return [gk / sigma for gk in g], {"sigma": sigma}

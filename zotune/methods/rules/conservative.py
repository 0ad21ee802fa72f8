"""conservative: keep the best of three candidate points (ZO-SGD-Cons)."""

from __future__ import annotations

import math

from zotune.methods.registry import register_rule
from zotune.methods.rules.sgd import SGD

CANDIDATES = {"-": -1.0, "+": 1.0}  # θ − lr·ĝ and θ + lr·ĝ, besides θ itself ("0")


@register_rule
class Conservative(SGD):
    """ZO-SGD-Cons, the conservative ZO-SGD of ZO-Bench (Zhang et al., 2024, "Revisiting
    Zeroth-Order Optimization for Memory-Efficient LLM Fine-Tuning: A Benchmark",
    arXiv:2402.11592): after the estimate, compare the loss at θ, θ − lr·ĝ and θ + lr·ĝ and
    move to the best of the three (ties stay at θ).

    Two extra forwards per step, on the step's last micro-batch; L(θ) is taken as that
    micro-batch's (L⁺ + L⁻)/2, which equals it up to O(ε²). Candidates are compared without
    weight decay; the chosen step is then applied with it. The choice and the candidates'
    losses are recorded, so replay makes the same moves. It evaluates plain forwards at
    arbitrary points: sequential or fused schedule, one direction per step.
    """

    name = "conservative"
    paper = "Zhang et al., 2024, arXiv:2402.11592"
    extra_forwards = 2

    def refusal(self, *, schedule, num_directions):
        if schedule == "dual":
            return ("rule 'conservative' evaluates its candidate points with plain forwards: "
                    "use schedule sequential or fused")
        if num_directions != 1:
            return "rule 'conservative' compares candidates along one direction: use num_directions 1"
        return None

    def choose(self, view, g, recorded):
        losses = dict(zip(CANDIDATES, view.losses_at([sign * view.lr * g[0] for sign in CANDIDATES.values()])))
        if recorded is not None:
            choice = recorded["candidate"]
        else:
            loss_plus, loss_minus = view.losses[-1]
            losses["0"] = (loss_plus + loss_minus) / 2
            choice = min(("0", "-", "+"), key=lambda c: losses[c] if math.isfinite(losses[c]) else math.inf)
        applied = {"0": None, "-": g, "+": [-g[0]]}[choice]
        return applied, {"candidate": choice, "candidate_losses": losses}

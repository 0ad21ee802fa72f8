"""es: evolution strategies' update, rewards normalised within the population of antithetic pairs."""

from __future__ import annotations

import statistics

from zotune.methods.registry import register_rule
from zotune.methods.rules.fzoo import FZOO


@register_rule
class ES(FZOO):
    """The update of evolution strategies with antithetic pairs (Salimans et al., 2017, "Evolution
    Strategies as a Scalable Alternative to Reinforcement Learning", arXiv:1703.03864), rewards
    z-scored within the population as in Qiu et al. (2025, "Evolution Strategies at Scale: LLM
    Fine-Tuning Beyond Reinforcement Learning", arXiv:2509.24372)::

        θ ← θ·(1 − lr·wd) − (lr / σ)·(1/q) Σ_k g_k z_k

    σ is the population standard deviation of the losses of all 2q members θ ± ε·z_k (each averaged
    over the step's micro-batches and ranks). With L = −R this is ES's θ + α·(1/2q)·Σ_n Z(R_n)·ε_n
    (Z the z-score, ε_n = ±z_k) for lr = α·ε: the mean of Z cancels within each pair. FZOO's
    arithmetic, with the spread taken over both signs (and q = 1 allowed). σ is recorded; a step
    whose members all score alike (σ = 0) applies nothing.
    """

    name = "es"
    paper = "Salimans et al., 2017, arXiv:1703.03864; Qiu et al., 2025, arXiv:2509.24372"
    antithetic_population = True

    def refusal(self, *, schedule, num_directions):
        return None  # one direction is a population of two members: its spread is defined

    def spread(self, losses, q):
        members = [statistics.fmean(side[k::q]) for side in zip(*losses) for k in range(q)]
        return statistics.pstdev(members)

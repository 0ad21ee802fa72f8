"""lowrank: perturb 2-D weights along a low-rank product U·Vᵀ (LOZO / SubZero style)."""

from __future__ import annotations

import math

from pydantic import Field

from zotune.methods.base import Estimator, MethodConfig
from zotune.methods.registry import register_estimator


class LowRankConfig(MethodConfig):
    rank: int = Field(2, ge=1, description="r: the rank of each 2-D weight's perturbation.")
    refresh_steps: int = Field(50, ge=1, description="ν: draw a new V every ν steps (U is new every step).")


@register_estimator
class LowRank(Estimator):
    """Low-rank perturbations for 2-D weights after LOZO (Chen et al., 2024, "Enhancing
    Zeroth-Order Fine-Tuning for Language Models with Low-Rank Structures", arXiv:2410.07698)
    and SubZero (Yu et al., 2024, arXiv:2410.08989)::

        z = U·Vᵀ/√r,   U: rows×r from the direction's seed,   V: cols×r, new every ν steps

    V's seed comes from the run seed and ⌊step/ν⌋ (recorded with each step as `v_window`), so
    nothing is stored and replay regenerates both. Other parameters (biases, norms) take plain
    noise. The update moves each weight within the same rank-r subspace as its perturbation.
    """

    name = "lowrank"
    paper = "Chen et al., 2024, arXiv:2410.07698; Yu et al., 2024, arXiv:2410.08989"
    Config = LowRankConfig

    def directions(self, p, step, noise):
        from zotune.noise import noise as generate
        from zotune.noise import seed_for

        param = p.param
        if param.dim() != 2:
            return None
        rows, cols = param.shape
        r = min(self.config.rank, rows, cols)
        window = step // self.config.refresh_steps
        v = generate(seed_for(noise.step_seed(window), 0, f"{p.name}#lowrank-V"), cols * r, noise.kind,
                     device=param.device).view(cols, r)

        def product(seed: int):
            u = generate(seed, rows * r, noise.kind, device=param.device).view(rows, r)
            return (u @ v.T) / math.sqrt(r)

        return product

    def begin_step(self, view):
        return {"v_window": view.step // self.config.refresh_steps}

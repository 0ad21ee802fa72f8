"""sparse: perturb only a masked fraction of each parameter (random or smallest-magnitude mask)."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from zotune.methods.base import Estimator, MethodConfig
from zotune.methods.registry import register_estimator


class SparseConfig(MethodConfig):
    density: float = Field(0.1, gt=0, le=1, description="Fraction of each parameter's elements that are perturbed.")
    mask: Literal["random", "magnitude"] = Field(
        "random", description="random: a new mask per direction, from its seed; magnitude: the smallest |θ|."
    )
    refresh_steps: int = Field(100, ge=1, description="magnitude: recompute the masks from θ every N steps.")


@register_estimator
class Sparse(Estimator):
    """Sparse perturbations z ⊙ m, with a 0/1 mask m of the given density per parameter.

    - `random`: each direction draws its own mask, m_i = [|n_i| < t] with n a second Gaussian
      stream seeded from the direction's seed and t = √2·erfinv(density), so P(m_i = 1) =
      density. Nothing is stored; replay regenerates it from the seed.
    - `magnitude`: the `density` fraction of each parameter with the smallest |θ|, recomputed
      from θ every `refresh_steps` steps, as in Sparse MeZO (Liu et al., 2024, "Sparse MeZO:
      Less Parameters for Better Performance in Zeroth-Order LLM Fine-Tuning",
      arXiv:2402.15751). The masks are kept as bool tensors (1 byte per trainable element);
      replay recomputes them from the replayed θ at the same steps.
    """

    name = "sparse"
    paper = "Liu et al., 2024, arXiv:2402.15751"
    Config = SparseConfig
    direction_state = ("sparse_mask",)

    @property
    def state_copies(self) -> float:
        return 0.25 if self.config.mask == "magnitude" else 0.0

    def directions(self, p, step, noise):
        import torch

        from zotune.noise import noise_like, seed_for

        param, kind = p.param, noise.kind
        if self.config.mask == "magnitude":
            mask = p.state["sparse_mask"]
            return lambda seed: noise_like(param, seed, kind) * mask
        threshold = math.sqrt(2) * torch.erfinv(torch.tensor(self.config.density, dtype=torch.float64)).item()

        def masked(seed: int) -> torch.Tensor:
            keep = noise_like(param, seed_for(seed, 0, "sparse-mask"), "gaussian").abs() < threshold
            return noise_like(param, seed, kind) * keep

        return masked

    def begin_step(self, view):
        if self.config.mask != "magnitude":
            return {}
        if view.step % self.config.refresh_steps and all("sparse_mask" in p.state for p in view.params):
            return {}
        for p in view.params:
            magnitude = p.state.get("master", p.param.data).abs().reshape(-1)
            k = max(1, round(self.config.density * magnitude.numel()))
            threshold = magnitude.kthvalue(k).values
            p.state["sparse_mask"] = (magnitude <= threshold).view(p.param.shape)
        return {"mask_refreshed": True}

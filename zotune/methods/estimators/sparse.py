"""sparse: perturb only a masked fraction of each parameter (random or smallest-magnitude mask)."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from zotune.methods import register
from zotune.methods.base import Estimator, MethodConfig


class SparseConfig(MethodConfig):
    density: float = Field(0.1, gt=0, le=1, description="Fraction of each parameter's elements that are perturbed.")
    mask: Literal["random", "magnitude"] = Field(
        "random", description="random: a new mask per direction, from its seed; magnitude: the smallest |θ|."
    )
    refresh_steps: int = Field(100, ge=1, description="magnitude: recompute the masks from θ every N steps.")


@register
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

    def directions(self, name, param, state, step, opt):
        import torch

        from zotune.noise import noise_like, seed_for

        kind = opt.kind
        if self.config.mask == "magnitude":
            mask = state["sparse_mask"]
            return lambda seed: noise_like(param, seed, kind) * mask
        threshold = math.sqrt(2) * torch.erfinv(torch.tensor(self.config.density, dtype=torch.float64)).item()

        def masked(seed: int) -> torch.Tensor:
            keep = noise_like(param, seed_for(seed, 0, "sparse-mask"), "gaussian").abs() < threshold
            return noise_like(param, seed, kind) * keep

        return masked

    def begin_step(self, opt, step):
        if self.config.mask != "magnitude":
            return {}
        named = list(opt.named_params())
        if step % self.config.refresh_steps and all("sparse_mask" in opt.state[p] for _, p, _ in named):
            return {}
        for _, p, _ in named:
            state = opt.state[p]
            magnitude = state.get("master", p.data).abs().reshape(-1)
            k = max(1, round(self.config.density * magnitude.numel()))
            threshold = magnitude.kthvalue(k).values
            state["sparse_mask"] = (magnitude <= threshold).view(p.shape)
        return {"mask_refreshed": True}

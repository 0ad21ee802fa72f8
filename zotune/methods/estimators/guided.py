"""guided: perturbations drawn partly from the span of the run's own recent estimates (guided ES)."""

from __future__ import annotations

import math

from pydantic import Field

from zotune.methods.base import Estimator, MethodConfig
from zotune.methods.registry import register_estimator

GRAM_CHUNK = 1 << 20  # elements per float64 slice of the history while its Gram matrix is summed
RANK_TOLERANCE = 1e-10  # eigenvalues of the Gram matrix below this share of the largest span nothing


class GuidedConfig(MethodConfig):
    history: int = Field(8, ge=1, description="τ: how many of the latest estimates ĝ span the guiding subspace.")
    alpha: float = Field(0.5, gt=0, le=1, description="α: the share of z's variance that stays isotropic; 1 is SPSA.")


@register_estimator
class Guided(Estimator):
    """Guided evolution strategies (Maheswaranathan et al., 2019, "Guided evolutionary strategies:
    augmenting random search with surrogate gradients", ICML, arXiv:1806.10230), with the run's own
    last τ estimates ĝ as the surrogate gradients. For each parameter, with H its last k ≤ τ estimates
    (k × n) and U = Hᵀ(HHᵀ)^(-1/2) their symmetric orthonormal basis (independent of their order)::

        z = √α · e[0:n] + √((1 − α)·n/k) · U · e[n:n+k]

    e one noise stream of the direction's seed, so E[zzᵀ] = α·I + (1 − α)·(n/k)·UUᵀ keeps SPSA's
    E‖z‖² = n, and with no history yet z is SPSA's (the same noise stream). The subspace is each parameter's own
    (a block of the history vectors), a superset of the span of the whole vectors. After each step
    ĝ = Σ_k (g_k/q)·z_k joins H. The history is kept, not regenerated (each past z depended on the
    history before it): τ fp32 copies of the trainable parameters (an adapter of 369k elements at τ = 8:
    12 MB); each z costs one k × n product more than SPSA's, and each step an O(k²n) Gram matrix and
    one more noise pass. Replay and resume rebuild H from the records and the checkpoint.
    """

    name = "guided"
    paper = "Maheswaranathan et al., 2019, arXiv:1806.10230"
    Config = GuidedConfig
    direction_state = ("guide",)

    def __init__(self, config: GuidedConfig | None = None):
        super().__init__(config)
        # name -> the mixing matrix of its history (k × k, float64, on the host): derived from the history
        # at each step's start (`begin_step`), so it is not optimizer state
        self.mixing: dict = {}

    @property
    def state_copies(self) -> float:
        return float(self.config.history)

    def directions(self, p, step, noise):
        from zotune.noise import noise as generate
        from zotune.noise import noise_like

        param, kind, n = p.param, noise.kind, p.param.numel()
        history, mix = p.state.get("guide"), self.mixing.get(p.name)
        if history is None or mix is None:
            return lambda seed: noise_like(param, seed, kind)
        k, scale = history.shape[0], math.sqrt(self.config.alpha)

        def guided(seed: int):
            subspace = (mix @ generate(seed, k, kind, offset=n).double()).float().to(param.device)
            z = generate(seed, n, kind, device=param.device).mul_(scale)
            return z.add_(subspace @ history).view(param.shape)

        return guided

    def begin_step(self, view):
        """The mixing matrix of each parameter's history: √((1 − α)·n/k)·(HHᵀ)^(-1/2), in float64."""
        import torch

        ranks = []
        for p in view.params:
            history = p.state.get("guide")
            if history is None:
                continue
            gram = torch.zeros(history.shape[0], history.shape[0], dtype=torch.float64)
            for start in range(0, history.shape[1], GRAM_CHUNK):
                piece = history[:, start:start + GRAM_CHUNK].double().cpu()
                gram += piece @ piece.T
            values, vectors = torch.linalg.eigh(gram)
            kept = values > RANK_TOLERANCE * values.max().clamp(min=torch.finfo(torch.float64).tiny)
            rank = int(kept.sum())
            ranks.append(rank)
            if rank == 0:
                self.mixing.pop(p.name, None)
                continue
            v = vectors[:, kept]
            scale = math.sqrt((1 - self.config.alpha) * history.shape[1] / rank)
            self.mixing[p.name] = scale * (v * values[kept].rsqrt()) @ v.T
        return {"guide_rank": min(ranks)} if ranks else {}

    def end_step(self, view, record):
        import torch

        from zotune.noise import seed_for

        q = record["q"]
        for p in view.params:
            z = self.directions(p, view.step, view.noise)
            ghat = torch.zeros(p.param.numel(), dtype=torch.float32, device=p.param.device)
            for k, g in enumerate(record["g"]):
                ghat.add_(z(seed_for(record["seed"], k, p.name)).reshape(-1), alpha=g / q)
            history = p.state.get("guide")
            history = ghat[None] if history is None else torch.cat([history, ghat[None]])
            p.state["guide"] = history[-self.config.history:].contiguous()

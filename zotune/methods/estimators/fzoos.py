"""fzoos: SPSA corrected by the gradient of a surrogate fitted to the run's own queries (FZooS)."""

from __future__ import annotations

import math

from pydantic import Field

from zotune.methods.base import Estimator, MethodConfig
from zotune.methods.registry import register_estimator

FEATURES = -3  # the step index the run's random features take their seeds from: never a trained step's


class FZooSConfig(MethodConfig):
    features: int = Field(32, ge=1, description="M: random Fourier features of the surrogate (each one noise pass "
                                                "per parameter to fit, one more to apply).")
    history: int = Field(8, ge=1, description="τ: how many of the latest steps' queries the surrogate is fitted to.")
    lengthscale: float = Field(10.0, gt=0, description="l: the RBF kernel's lengthscale, in the units of θ; a few "
                                                       "times the perturbation's length ε·√(trained elements).")
    noise: float = Field(1e-2, gt=0, description="σ²: the observation noise of the fit (its ridge).")
    gamma: float = Field(1.0, ge=0, le=1, description="γ: the weight of the surrogate's correction; 0 is SPSA, "
                                                      "1 the unbiased control variate.")


@register_estimator
class FZooS(Estimator):
    """The trajectory-informed surrogate gradient of FZooS (Shu et al., 2023, "Federated Zeroth-Order
    Optimization using Trajectory-Informed Surrogate Gradients", arXiv:2308.04077), in one process.

    A Gaussian process with an RBF kernel of lengthscale l (a Gaussian `zo.perturbation`; with Rademacher
    noise the features give a product-of-cosines kernel instead), in random Fourier features
    φ_m(θ) = √(2/M)·cos(w_m·θ + b_m) (w_m = e_m/l, e_m the run's noise of feature m's seed, b_m uniform
    in [0, 2π)), is fitted to the last τ steps' queries. Each direction k of a step is one observation:
    its g_k = (L(θ + εz_k) − L(θ − εz_k))/(2ε), both losses of one batch, so the batch's offset cancels,
    against the feature row r_m = (φ_m(θ + εz_k) − φ_m(θ − εz_k))/(2ε) = −√(2/M)·sin(w_m·θ + b_m)·sin(ε·w_m·z_k)/ε.
    The posterior mean's weights c = (RᵀR + σ²I)⁻¹Rᵀy give ∇μ(θ) = Σ_m a_m·e_m with
    a_m = −c_m·√(2/M)·sin(w_m·θ + b_m)/l. FZooS corrects a local estimate by the surrogate's gradient
    less the same estimate of it; with the fresh SPSA estimate as the local one::

        ĝ = γ·∇μ(θ) + (1/q)·Σ_k (g_k − γ·z_k·∇μ(θ))·z_k

    an unbiased estimate whatever μ (E[zzᵀ] = I), with less variance the better μ fits; with no history
    μ = 0 and ĝ is SPSA's. z is plain noise. The history is a few scalars per query (τ·q rows of M + 1,
    float64, kept with the first parameter's state), θ itself is not kept; each step costs M noise passes
    per parameter for the dot products w_m·θ and w_m·z_k, and M more to apply ∇μ's terms. Replay
    recomputes the same dot products from the same θ; resume loads the history from the checkpoint.
    Its correction is in the units of g, so rules that rescale or choose among the projected gradients
    (`conservative`, `fzoo`, `es`) are refused.
    """

    name = "fzoos"
    paper = "Shu et al., 2023, arXiv:2308.04077"
    Config = FZooSConfig

    def __init__(self, config: FZooSConfig | None = None):
        super().__init__(config)
        self.q = 1
        # what begin_step derived from θ and the history for its step (∇μ's weights a_m, the corrections
        # z_k·∇μ, the features' sines and w_m·z_k for end_step's rows): not optimizer state
        self.current: dict | None = None

    corrects_estimate = True

    def num_directions(self, sizes, asked):
        self.q = asked
        return asked

    def _seed(self, noise, m: int, name: str) -> int:
        from zotune.noise import seed_for, step_seed

        return seed_for(step_seed(noise.run_seed, FEATURES), m, name)

    def begin_step(self, view):
        """Fit the surrogate to the history, and take this step's dot products e_m·θ and e_m·z_k."""
        import torch

        from zotune.kernels import perturb_
        from zotune.noise import noise as generate
        from zotune.noise import seed_for

        M, q, kind, f64 = self.config.features, self.q, view.noise.kind, torch.float64
        dots_theta, dots_z = torch.zeros(M, dtype=f64), torch.zeros(M, q, dtype=f64)
        for p in view.params:
            theta = p.state.get("master", p.param).reshape(-1).float()
            zs = torch.zeros(q, theta.numel(), dtype=torch.float32, device=theta.device)
            for k in range(q):  # the kernels' noise, equal to zotune.noise's
                perturb_(zs[k], seed_for(view.seed, k, p.name), 1.0, kind=kind)
            e = torch.empty_like(theta)
            for m in range(M):
                perturb_(e.zero_(), self._seed(view.noise, m, p.name), 1.0, kind=kind)
                dots_theta[m] += float(e @ theta)
                dots_z[m] += (zs @ e).double().cpu()
        phases = 2 * math.pi * torch.special.ndtr(generate(self._seed(view.noise, 0, "fzoos-phase"), M).double())
        sines = torch.sin(dots_theta / self.config.lengthscale + phases)
        a = torch.zeros(M, dtype=f64)
        history = view.params[0].state.get("fzoos")
        if history is not None:  # kept on the host; a checkpoint load may have moved it beside the parameter
            history = history.cpu()
            rows, y = history[..., :M].reshape(-1, M), history[..., M].reshape(-1)
            c = torch.linalg.solve(rows.T @ rows + self.config.noise * torch.eye(M, dtype=f64), rows.T @ y)
            a = -c * math.sqrt(2 / M) * sines / self.config.lengthscale
        self.current = {"step": view.step, "noise": view.noise, "a": a, "s": a @ dots_z, "sines": sines,
                        "dots_z": dots_z}
        return {}

    def update_terms(self, name, step, seeds, coefs):
        """γ·a_m along e_m first, then each direction's g_k/q less γ·(z_k·∇μ)/q."""
        current, gamma, q = self.current, self.config.gamma, len(seeds)
        if current is None or current["step"] != step or not gamma or not current["a"].any():  # no surrogate yet
            return seeds, coefs
        extra = [self._seed(current["noise"], m, name) for m in range(self.config.features)]
        return ([*extra, *seeds], [gamma * float(a) for a in current["a"]]
                + [c - gamma * float(s) / q for c, s in zip(coefs, current["s"])])

    def end_step(self, view, record):
        """This step's q observations join the history: g_k against its row of feature differences."""
        import torch

        current, eps, M = self.current, record["eps"], self.config.features
        sin_eps = torch.sin(eps * current["dots_z"] / self.config.lengthscale) / eps  # M × q
        rows = -math.sqrt(2 / M) * current["sines"][:, None] * sin_eps
        step_rows = torch.cat([rows.T, torch.tensor(record["g"], dtype=torch.float64)[:, None]], dim=1)
        state = view.params[0].state
        history = step_rows[None] if "fzoos" not in state else torch.cat([state["fzoos"].cpu(), step_rows[None]])
        state["fzoos"] = history[-self.config.history:].contiguous()

"""hizoo: perturbations preconditioned by a running diagonal Hessian estimate."""

from __future__ import annotations

from pydantic import Field

from zotune.methods.base import Estimator, MethodConfig
from zotune.methods.registry import register_estimator


class HiZOOConfig(MethodConfig):
    smoothing: float = Field(
        1e-6, gt=0, lt=1, description="α: weight of each step's curvature in the running diagonal Hessian."
    )


@register_estimator
class HiZOO(Estimator):
    """Hessian-informed directions after HiZOO (Zhao et al., 2024, "Second-Order Fine-Tuning
    without Pain for LLMs: A Hessian Informed Zeroth-Order Optimizer", arXiv:2402.15173).

    Keeps a diagonal Hessian estimate h (one fp32 copy of the trainable parameters, starting
    at 1) and perturbs along u = z/√h, so directions of high curvature move less (the update
    follows u too). It costs one extra forward per micro-batch, at θ: with it the curvature
    along u is c = |L⁺ + L⁻ − 2·L(θ)| / (2ε²), and after the update

        h ← (1 − α)·h + α·c·h·z²        (averaged over directions and micro-batches)

    L(θ) is recorded with the step, so replay recomputes h exactly. The extra forward is a
    plain one: sequential or fused schedule.
    """

    name = "hizoo"
    paper = "Zhao et al., 2024, arXiv:2402.15173"
    Config = HiZOOConfig
    loss_at_theta = True
    direction_state = ("hessian",)
    state_copies = 1
    extra_forwards = 1

    def refusal(self, *, schedule, num_directions):
        if schedule == "dual":
            return "estimator 'hizoo' needs a plain forward at θ each step: use schedule sequential or fused"
        return None

    def directions(self, p, step, noise):
        import torch

        from zotune.noise import noise_like

        if "hessian" not in p.state:
            p.state["hessian"] = torch.ones(p.param.shape, dtype=torch.float32, device=p.param.device)
        scale = p.state["hessian"].rsqrt()
        param, kind = p.param, noise.kind
        return lambda seed: noise_like(param, seed, kind) * scale

    def end_step(self, view, record):
        import torch

        from zotune.noise import noise_like, seed_for

        q, eps, alpha = record["q"], record["eps"], self.config.smoothing
        pairs = list(zip(record["loss_plus"], record["loss_minus"]))
        zero = record["loss_zero"]  # one per micro-batch; pairs are q per micro-batch
        curvature = [0.0] * q
        for i, (loss_plus, loss_minus) in enumerate(pairs):
            curvature[i % q] += abs(loss_plus + loss_minus - 2 * zero[i // q]) / (2 * eps**2) / len(zero)
        for p in view.params:
            h = p.state["hessian"]
            observed = torch.zeros_like(h)
            for k, c in enumerate(curvature):
                z = noise_like(p.param, seed_for(record["seed"], k, p.name), view.noise.kind)
                observed.add_(z * z, alpha=c / q)
            h.mul_(observed.mul_(alpha).add_(1 - alpha))  # (1 − α)·h + α·c·h·z²

"""adam: Adam on the ZO estimate (ZO-Adam)."""

from __future__ import annotations

from pydantic import Field

from zotune.methods.base import MethodConfig, ParamUpdate, Rule
from zotune.methods.registry import register_rule


class AdamConfig(MethodConfig):
    beta1: float = Field(0.9, ge=0, lt=1, description="Decay of the first moment.")
    beta2: float = Field(0.999, ge=0, lt=1, description="Decay of the second moment.")
    eps: float = Field(1e-8, gt=0, description="Added to the second moment's square root.")


@register_rule
class Adam(Rule):
    """ZO-Adam: AdamW (decoupled weight decay, bias correction) on the ZO estimate ĝ, after
    ZO-AdaMM (Chen et al., 2019, "ZO-AdaMM: Zeroth-Order Adaptive Momentum Method for Black-Box
    Optimization", arXiv:1910.06513), as benchmarked by ZO-Bench (arXiv:2402.11592)::

        m ← β1·m + (1 − β1)·ĝ,  v ← β2·v + (1 − β2)·ĝ²
        θ ← θ·(1 − lr·wd) − lr/(1 − β1^t) · m / (√v/√(1 − β2^t) + eps)

    State: m and v, two fp32 copies of the trainable parameters. That is 2× their memory on
    top of ZO-SGD: with full-parameter training it is the biggest cost of a ZO run, with an
    adapter it is small.
    """

    name = "adam"
    paper = "Chen et al., 2019, arXiv:1910.06513"
    Config = AdamConfig
    state_copies = 2

    def apply(self, u: ParamUpdate) -> None:
        from zotune.kernels import adam_update_

        u.to_theta()
        step = u.state["adam_step"] = u.state.get("adam_step", 0) + 1
        seed, coef, kw = u.one_direction()
        c = self.config
        adam_update_(u.param, u.fp32_state("exp_avg"), u.fp32_state("exp_avg_sq"), seed, coef, u.lr, u.wd, c.beta1,
                     c.beta2, c.eps, step, **kw)

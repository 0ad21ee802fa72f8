"""momentum: ZO-SGD with heavy-ball momentum (ZO-SGD-MMT)."""

from __future__ import annotations

from pydantic import Field

from zotune.methods.base import MethodConfig, ParamUpdate, Rule
from zotune.methods.registry import register_rule


class MomentumConfig(MethodConfig):
    beta: float = Field(0.9, ge=0, lt=1, description="Momentum coefficient β.")


@register_rule
class Momentum(Rule):
    """ZO-SGD-MMT, heavy-ball momentum on the ZO estimate, as benchmarked by ZO-Bench (Zhang et
    al., 2024, "Revisiting Zeroth-Order Optimization for Memory-Efficient LLM Fine-Tuning: A
    Benchmark", arXiv:2402.11592)::

        m ← β·m + ĝ
        θ ← θ·(1 − lr·wd) − lr·m

    State: m, one fp32 copy of the trainable parameters.
    """

    name = "momentum"
    paper = "Zhang et al., 2024, arXiv:2402.11592"
    Config = MomentumConfig
    state_copies = 1

    def apply(self, u: ParamUpdate) -> None:
        from zotune.kernels import momentum_update_

        u.to_theta()
        seed, coef, kw = u.one_direction()
        momentum_update_(u.param, u.fp32_state("momentum"), seed, coef, u.lr, u.wd, self.config.beta, **kw)

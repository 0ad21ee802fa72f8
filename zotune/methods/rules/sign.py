"""sign: the sign of the ZO estimate (ZO-SGD-Sign)."""

from __future__ import annotations

from zotune.methods.base import ParamUpdate, Rule
from zotune.methods.registry import register_rule


@register_rule
class Sign(Rule):
    """ZO-SGD-Sign, after ZO-signSGD (Liu et al., 2019, "signSGD via Zeroth-Order Oracle",
    ICLR 2019), as benchmarked by ZO-Bench (arXiv:2402.11592)::

        θ ← θ·(1 − lr·wd) − lr·sign(ĝ)

    Every element moves by exactly lr, so lr is much smaller than ZO-SGD's. No state; ĝ is
    materialised one parameter at a time.
    """

    name = "sign"
    paper = "Liu et al., 2019, ICLR (ZO-signSGD)"
    stochastic_rounding = True

    def apply(self, u: ParamUpdate) -> None:
        import torch

        from zotune.kernels import restore_and_update_

        u.to_theta()
        signs = torch.sign(u.ghat())
        restore_and_update_(u.param, 0, 0.0, 1.0, u.lr, u.wd, rounding_seed=u.rounding_seed,
                            **u.kernel_kw(lambda _: signs))

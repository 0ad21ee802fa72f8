"""sgd: ZO-SGD, MeZO's rule."""

from __future__ import annotations

from zotune.methods.base import ParamUpdate, Rule
from zotune.methods.registry import register_rule


@register_rule
class SGD(Rule):
    """ZO-SGD (Malladi et al., 2023, "Fine-Tuning Language Models with Just Forward Passes",
    arXiv:2305.17333)::

        θ ← θ·(1 − lr·wd) − lr·ĝ

    No state. The restore from the fused schedule's last − offset rides in the same pass
    (`restore_and_update_`).
    """

    name = "sgd"
    paper = "Malladi et al., 2023, arXiv:2305.17333"
    stochastic_rounding = True
    def apply(self, u: ParamUpdate) -> None:
        from zotune.kernels import perturb_, restore_and_update_

        if u.rounding_seed is not None and len(u.seeds) > 1:  # one rounding of the whole ĝ
            u.to_theta()
            seed, coef, kw = u.one_direction()
            restore_and_update_(u.param, seed, 0.0, coef, u.lr, u.wd, rounding_seed=u.rounding_seed, **kw)
            return
        lead = len(u.seeds) - 1  # goes first: a pending restore is along the last direction
        kw = u.kernel_kw()
        restore_and_update_(u.param, u.seeds[lead], u.restore, u.coefs[lead], u.lr, u.wd, rounding_seed=u.rounding_seed,
                            **kw)
        for seed, coef in zip(u.seeds[:lead], u.coefs[:lead]):
            if u.master is None:
                perturb_(u.param, seed, -u.lr * coef, **kw)
            else:  # wd was applied with the lead direction
                restore_and_update_(u.param, seed, 0.0, coef, u.lr, 0.0, **kw)

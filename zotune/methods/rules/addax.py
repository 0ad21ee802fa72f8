"""addax: ZO-SGD on the rows that would cost most activation memory, backprop on the others (Addax)."""

from __future__ import annotations

from pydantic import Field

from zotune.methods.base import MethodConfig, ParamUpdate, Rule
from zotune.methods.registry import register_rule


class AddaxConfig(MethodConfig):
    alpha: float = Field(0.5, ge=0, le=1,
                         description="Weight α of the ZO estimate; the first-order gradient gets 1 - α.")
    max_tokens: int = Field(
        256, ge=1, description="Activation budget of the first-order part: ZOTrainer backpropagates through the "
        "shortest rows of each batch while rows x their longest length stays within it (one row at least stays ZO).")


@register_rule
class Addax(Rule):
    """Addax (Li et al., 2025, "Addax: Utilizing Zeroth-Order Gradients to Improve Memory
    Efficiency and Performance of SGD for Fine-Tuning Language Models", ICLR, arXiv:2410.06441)::

        θ ← θ·(1 − lr·wd) − lr·(α·ĝ⁰ + (1 − α)·g¹)

    ĝ⁰ is the SPSA estimate from the ZO rows' forwards, g¹ the backprop gradient of the other rows:
    the parameters' `.grad` when `step()` runs (`zotune.first_order` picks the rows and keeps them
    within `max_tokens`; a raw ZOOptimizer adds whatever backward ran before `step()`, none: α·ĝ⁰).
    Costs: the activations and gradients of `max_tokens` tokens, and g¹ is saved beside the
    trajectory log (in the gradient's dtype, 4 bytes per trained element per step for fp32
    weights: replay needs it). The update
    materialises α·ĝ⁰ + (1 − α)·g¹ in fp32, one parameter at a time. g¹ must be taken at θ, so
    not with `fused` (which leaves θ displaced between micro-batches).
    """

    name = "addax"
    paper = "Li et al., 2025 (Addax), arXiv:2410.06441"
    Config = AddaxConfig
    stochastic_rounding = True
    first_order = True

    def refusal(self, *, schedule, num_directions):
        if schedule == "fused":
            return ("rule 'addax' takes its first-order gradient at θ, which schedule 'fused' leaves displaced "
                    "between micro-batches: use schedule dual or sequential")
        return None

    def apply(self, u: ParamUpdate) -> None:
        from zotune.kernels import restore_and_update_

        u.to_theta()
        total = u.ghat().mul_(self.config.alpha)
        if u.grad is not None:
            total.add_(u.grad, alpha=1 - self.config.alpha)
        restore_and_update_(u.param, 0, 0.0, 1.0, u.lr, u.wd, rounding_seed=u.rounding_seed,
                            **u.kernel_kw(lambda _: total))

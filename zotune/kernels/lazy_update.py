"""lazy_update_and_perturb_: the dual schedule's pass that applies the previous step's pending
update and the next step's +ε perturbation together, generating both z streams in registers::

    θ = θ·decay + prev_coef·z_prev
    param = θ + next_scale·z_next

Without ``master`` θ is read from param (fp32, or 16-bit rounded once at the end). With an fp32
``master``, master holds θ and is updated; param = round(master + next_scale·z_next).

A param left at θ − ε·z_prev after the − half, with update θ·(1 − lr·wd) − lr·g·z_prev pending,
takes decay = 1 − lr·wd and prev_coef = ε·decay − lr·g (equal in exact arithmetic to a restore
then the update; in float it is a different rounding sequence, so replay must use the same op).

Out of place (``out``; DESIGN §3, "θ never moves except by its update"): θ is updated in place
and the perturbed copy goes to ``out``::

    θ = θ·decay + prev_coef·z_prev          stored: param (or master, and param = round(master))
    out = θ' + next_scale·z_next            θ' = the value stored (param's, or master's)

so param sits at θ, never displaced; with prev_coef = −lr·g it is the pending update.

``rounding_seed`` (16-bit param, no master): what is stored into param is rounded
stochastically (`_rounding`) instead of to nearest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from zotune.kernels import _dispatch, _fused, _rounding
from zotune.kernels._dispatch import f32, nearest, store, tile, triton_jit
from zotune.kernels._philox import KIND_ID, noise_tile
from zotune.kernels._rounding import stochastic_tile, store_stochastic

if TYPE_CHECKING:
    import triton.language as tl

__all__ = ["lazy_update_and_perturb_"]


@triton_jit(do_not_specialize=["prev_seed", "next_seed", "rounding_seed", "n", "offset"])
def _lazy_kernel(p_ptr, m_ptr, o_ptr, prev_seed, prev_coef, next_seed, next_scale, decay, rounding_seed, n, offset,
                 KIND: tl.constexpr, HAS_MASTER: tl.constexpr, HAS_OUT: tl.constexpr, ROUND: tl.constexpr,
                 ROWS: tl.constexpr):
    rows, idx, mask = tile(n, offset, ROWS)
    z_prev = noise_tile(prev_seed, rows, KIND)
    z_next = noise_tile(next_seed, rows, KIND)
    if HAS_MASTER:
        theta = tl.load(m_ptr + idx, mask=mask)
    else:
        theta = tl.load(p_ptr + idx, mask=mask).to(tl.float32)
    theta = theta * decay + prev_coef * z_prev
    if HAS_MASTER:
        tl.store(m_ptr + idx, theta, mask=mask)
    if HAS_OUT:
        if not HAS_MASTER:  # θ' = the value param holds
            if ROUND:
                theta = stochastic_tile(theta, tl.randint(rounding_seed, offset.to(tl.int64) + idx), p_ptr)
            else:
                theta = nearest(theta, p_ptr)
        store(p_ptr + idx, theta, mask)
        store(o_ptr + idx, theta + next_scale * z_next, mask)
    elif ROUND:
        store_stochastic(p_ptr + idx, theta + next_scale * z_next, tl.randint(rounding_seed, offset.to(tl.int64) + idx),
                         mask)
    else:
        store(p_ptr + idx, theta + next_scale * z_next, mask)


def lazy_update_and_perturb_twin(param, prev_seed, prev_coef, next_seed, next_scale, decay, kind, offset, master=None,
                                 impl="eager", directions=None, rounding_seed=None, out=None):
    """The reference, on flat contiguous tensors; coefficients already rounded to float32."""
    _fused.run("lazy_update_and_perturb", lazy_update_and_perturb_math, {"param": param, "master": master, "out": out},
               (prev_seed, next_seed), kind, offset, (prev_coef, next_scale, decay), impl, directions, rounding_seed)


def lazy_update_and_perturb_math(zs, t, c):
    """One piece's float32 arithmetic (see `_fused`)."""
    (z_prev, z_next), (prev_coef, next_scale, decay) = zs, c
    theta = t["master"] if t["master"] is not None else t["param"].float()
    theta = theta * decay + prev_coef * z_prev
    out = {} if t["master"] is None else {"master": theta}
    if t["out"] is None:
        out["param"] = _rounding.to_param(theta + next_scale * z_next, t)
        return out
    if t["master"] is None:
        theta = _rounding.stored(theta, t)  # θ' = what param holds: rounded once, exactly stored
    out["param"] = theta
    out["out"] = theta + next_scale * z_next
    return out


@torch.no_grad()
def lazy_update_and_perturb_(param: torch.Tensor, prev_seed: int, prev_coef: float, next_seed: int, next_scale: float,
                             *, decay: float = 1.0, kind: str, offset: int = 0,
                             master: torch.Tensor | None = None, directions=None, rounding_seed: int | None = None,
                             out: torch.Tensor | None = None) -> torch.Tensor:
    """In place: θ = θ·decay + prev_coef·z(prev_seed); param = θ + next_scale·z(next_seed). θ is
    param itself, or ``master`` when given (param = round(master + next_scale·z_next)). Returns param.

    With ``out`` (param's shape and device; float32, bfloat16 or float16): param (or master, and
    param = round(master)) takes the updated θ, and out = θ' + next_scale·z_next rounded to out's
    dtype, θ' being the value stored (param's, or master's). Returns out.

    ``rounding_seed``: store into a bfloat16/float16 param (no master) with stochastic rounding
    driven by Philox(rounding_seed) at the element's global index (`_rounding`); ValueError for a
    float32 param or with a master."""
    prev_seed, offset = _dispatch.check(param, prev_seed, kind, offset, master=master,
                                        **({} if out is None else {"out": out}))
    next_seed, _ = _dispatch.check(param, next_seed, kind, offset)
    rounding_seed = _rounding.check(param, master, rounding_seed)
    prev_coef, next_scale, decay = f32(prev_coef), f32(next_scale), f32(decay)
    impl = _dispatch.choose(param.device, directions)
    with _dispatch.flat(param, master, out) as (p, m, o):
        if impl == "triton":
            _dispatch.launch(_lazy_kernel, p.numel(), offset, p, p if m is None else m, p if o is None else o,
                             prev_seed, prev_coef, next_seed, next_scale, decay, rounding_seed or 0,
                             KIND=KIND_ID[kind], HAS_MASTER=m is not None, HAS_OUT=o is not None,
                             ROUND=rounding_seed is not None)
        else:
            lazy_update_and_perturb_twin(p, prev_seed, prev_coef, next_seed, next_scale, decay, kind, offset,
                                         master=m, impl=impl, directions=directions, rounding_seed=rounding_seed,
                                         out=o)
    return param if out is None else out

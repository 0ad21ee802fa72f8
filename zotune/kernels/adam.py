"""adam_update_: Adam on the ZO gradient estimate ĝ = g·z, from a clean θ, with decoupled weight
decay (AdamW) and bias correction, in the order of torch.optim.AdamW::

    m = beta1·m + (1 − beta1)·ĝ
    v = beta2·v + (1 − beta2)·ĝ²
    θ = θ·(1 − lr·wd) − (lr / (1 − beta1^step))·(m / (sqrt(v) / sqrt(1 − beta2^step) + adam_eps))

θ is param, or the fp32 ``master`` when given (then param = round(master)). m and v are
computed in float32 and stored in their own dtype. The kernel uses correctly rounded sqrt and
division (tl.sqrt_rn, tl.div_rn) rather than the GPU's approximate ones; the twin likewise
takes a correctly rounded sqrt.
"""

from __future__ import annotations

import math
import operator
from typing import TYPE_CHECKING

import torch

from zotune.kernels import _dispatch, _fused
from zotune.kernels._dispatch import f32, store, tile, triton_jit
from zotune.kernels._philox import KIND_ID, noise_tile

if TYPE_CHECKING:
    import triton.language as tl

__all__ = ["adam_update_"]


@triton_jit(do_not_specialize=["seed", "n", "offset"])
def _adam_kernel(p_ptr, m_ptr, exp_avg_ptr, exp_avg_sq_ptr, seed, g, beta1, one_minus_beta1, beta2, one_minus_beta2,
                 sqrt_bc2, adam_eps, step_size, decay, n, offset, KIND: tl.constexpr, HAS_MASTER: tl.constexpr,
                 ROWS: tl.constexpr):
    rows, idx, mask = tile(n, offset, ROWS)
    ghat = g * noise_tile(seed, rows, KIND)
    m = beta1 * tl.load(exp_avg_ptr + idx, mask=mask).to(tl.float32) + one_minus_beta1 * ghat
    v = beta2 * tl.load(exp_avg_sq_ptr + idx, mask=mask).to(tl.float32) + one_minus_beta2 * (ghat * ghat)
    store(exp_avg_ptr + idx, m, mask)
    store(exp_avg_sq_ptr + idx, v, mask)
    denom = tl.div_rn(tl.sqrt_rn(v), sqrt_bc2) + adam_eps
    if HAS_MASTER:
        theta = tl.load(m_ptr + idx, mask=mask)
    else:
        theta = tl.load(p_ptr + idx, mask=mask).to(tl.float32)
    theta = theta * decay - step_size * tl.div_rn(m, denom)
    if HAS_MASTER:
        tl.store(m_ptr + idx, theta, mask=mask)
    store(p_ptr + idx, theta, mask)


def adam_update_twin(param, exp_avg, exp_avg_sq, seed, g, beta1, one_minus_beta1, beta2, one_minus_beta2, sqrt_bc2,
                     adam_eps, step_size, decay, kind, offset, master=None, impl="eager", directions=None):
    """The reference, on flat contiguous tensors; coefficients already rounded to float32."""
    _fused.run("adam", adam_update_math,
               {"param": param, "master": master, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}, (seed,), kind,
               offset, (g, beta1, one_minus_beta1, beta2, one_minus_beta2, sqrt_bc2, adam_eps, step_size, decay),
               impl, directions)


def adam_update_math(zs, t, c):
    """One piece's float32 arithmetic (see `_fused`)."""
    (z,), (g, beta1, one_minus_beta1, beta2, one_minus_beta2, sqrt_bc2, adam_eps, step_size, decay) = zs, c
    ghat = g * z
    m = beta1 * t["exp_avg"].float() + one_minus_beta1 * ghat
    v = beta2 * t["exp_avg_sq"].float() + one_minus_beta2 * (ghat * ghat)
    # torch's float32 CPU sqrt is not always correctly rounded (MKL; ~17% of inputs off by an
    # ulp here); the float64 sqrt rounded once to float32 is, as tl.sqrt_rn is.
    denom = v.double().sqrt().float() / sqrt_bc2 + adam_eps
    theta = t["master"] if t["master"] is not None else t["param"].float()
    theta = theta * decay - step_size * (m / denom)
    out = {"exp_avg": m, "exp_avg_sq": v, "param": theta}
    if t["master"] is not None:
        out["master"] = theta
    return out


@torch.no_grad()
def adam_update_(param: torch.Tensor, m: torch.Tensor, v: torch.Tensor, seed: int, g: float, lr: float, wd: float,
                 beta1: float, beta2: float, adam_eps: float, step: int, *, kind: str, offset: int = 0,
                 master: torch.Tensor | None = None, directions=None) -> torch.Tensor:
    """In place: one AdamW step on ĝ = g·z (``step`` counts from 1), updating m, v and θ (param,
    or ``master`` when given, then param = round(master)). Returns param."""
    seed, offset = _dispatch.check(param, seed, kind, offset, master=master, m=m, v=v)
    step = operator.index(step)
    if step < 1:
        raise ValueError(f"step counts from 1, got {step}")
    coefs = (f32(g), f32(beta1), f32(1.0 - beta1), f32(beta2), f32(1.0 - beta2),
             f32(math.sqrt(1.0 - beta2**step)), f32(adam_eps), f32(lr / (1.0 - beta1**step)), f32(1.0 - lr * wd))
    impl = _dispatch.choose(param.device, directions)
    with _dispatch.flat(param, master, m, v) as (p, mst, exp_avg, exp_avg_sq):
        if impl == "triton":
            _dispatch.launch(_adam_kernel, p.numel(), offset, p, p if mst is None else mst, exp_avg, exp_avg_sq, seed,
                             *coefs, KIND=KIND_ID[kind], HAS_MASTER=mst is not None)
        else:
            adam_update_twin(p, exp_avg, exp_avg_sq, seed, *coefs, kind, offset, master=mst, impl=impl,
                             directions=directions)
    return param
